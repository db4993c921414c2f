"""`build_app`: validate `AppArgs`, then wire the deployments by passing handles (as Ray Serve LLM's builders do).

    JobStore ─┬─ Encode ─ Sketch ─ Render ─ Decode    (mode: disaggregated; stage replicas report to the store)
              │  [+ Flex: Colocated replicas beside the pools, taking whole jobs when free]
              │  or Colocated                          (mode: colocated; every role in each replica)
              └─ Ingress (FastAPI; drives each job through the stages by handle)

Usable as `import_path: srserve.serving:build_app` in a Serve config (its `args:` are `AppArgs`) and from
Python: `serve.run(build_app({"model": None}))`.
"""
from __future__ import annotations

from typing import Any

from ray import serve

from srserve.serving.args import AppArgs
from srserve.serving.colocated import Colocated
from srserve.serving.ingress import Ingress
from srserve.serving.store_deployment import JobStoreDeployment
from srserve.serving.stages import Decode, Encode, Render, Sketch

DEPLOYMENTS = {"encode": Encode, "sketch": Sketch, "render": Render, "decode": Decode, "colocated": Colocated,
               "flex": Colocated}
WITH_ARTIFACTS = ("decode", "colocated", "flex")  # the deployments that write videos


def build_app(args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    """The srserve Serve application. Raises pydantic's ValidationError naming any bad argument."""
    args = (args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})).resolved()
    store = serve.deployment(JobStoreDeployment).options(
        name="JobStore", num_replicas=1, max_ongoing_requests=1000,
        health_check_period_s=2.0,  # replaced soon after a kill; meanwhile the ingress answers 503 store_unavailable
        ray_actor_options={"num_cpus": args.job_store_num_cpus, "resources": args.job_store_resources},
        logging_config={"enable_access_log": False},
    ).bind(args.job_store_path)
    stages = {}
    for name, options in [*args.stages().items(), *([("flex", args.flex)] if args.flex else [])]:
        extra = (args.artifacts_url,) if name in WITH_ARTIFACTS else ()
        # The app-level observability options reach each stage through its options.
        observed = {"log_prompts": options.log_prompts or args.log_prompts,
                    "model_name": options.model_name or args.model_name,
                    # the denoising stages save what they hand on; Encode loads it for a resumed job
                    "checkpoint_url": options.checkpoint_url or (args.artifacts_url if args.watchdog.checkpoint_stages
                                                                 and args.mode == "disaggregated" else None)}
        stages[name] = serve.deployment(DEPLOYMENTS[name]).options(
            name=name.capitalize(), **options.deployment_options(),
        ).bind(args.model, store, {**options.model_dump(), **observed}, *extra)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", **args.ingress.deployment_options(args.retry_after_s),
    )
    return ingress.bind(store, stages, args.model_dump())
