"""srserve: text-to-video diffusion served with Sketching-Rendering cooperation (SRDiffusion) on Ray Serve."""
from srserve.config import CacheConfig, GenerationRequest, ModelSpec

__version__ = "0.1.0"
__all__ = ["CacheConfig", "GenerationRequest", "ModelSpec", "__version__"]
