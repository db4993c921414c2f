"""The SR engine: families, switch policies, the handoff state and the denoising loop. No Ray, no HTTP."""
