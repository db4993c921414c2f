"""The control plane's decisions as pure functions of recorded inputs (no Ray, no torch): stage-ratio autoscaling
(`autoscale`) and the SLO-driven switch-point controller (`slo`). The deployments gather the inputs and apply the
outputs; `autoscale.StageRatioPolicy` is the adapter Ray Serve calls."""
