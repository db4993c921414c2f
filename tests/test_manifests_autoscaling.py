"""The Kubernetes layouts' autoscaling (k8s/): srserve's stage-ratio policy as the Serve application's
`autoscaling_policy` in serveConfigV2, the stages' `autoscaling_config` in the shape that leaves every delay to the
policy, and the Ray autoscaler that turns the policy's replicas into pods.

Pure Python: the manifests are rendered by tests/kustomize_render.py and read with test_manifests.py's helpers; the
policy is imported, pickled and instantiated the way Serve 2.60 does it, and driven for two ticks through Serve's own
application-level wrapper with contexts built from the rendered configs (no Ray runtime).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from rayservice import app_args, ray_groups, read_rayservice, serve_config
from test_manifests import K8S, RAYSERVICE_TARGETS, _ids

from srserve.control.autoscale import STAGES, StageRatioPolicy, deployment_autoscaling_config

POLICY = "srserve.control.autoscale:StageRatioPolicy"
GPU_OVERLAYS = [K8S / "overlays" / "wan2.1-14b-1.3b", K8S / "overlays" / "cogvideox-5b-2b"]
POLICY_TARGETS = [K8S / "base", *GPU_OVERLAYS]  # the base is the Wan layout the GPU overlays patch
SERVE_FACTORS = ("upscaling_factor", "downscaling_factor", "smoothing_factor", "upscale_smoothing_factor",
                 "downscale_smoothing_factor")


def _app(service: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve_config(service)["applications"]
    return app


def _autoscaled(args: Any) -> dict[str, dict[str, Any]]:
    """stage -> its autoscaling_config, for the stages that autoscale."""
    return {stage: options.autoscaling_config for stage, options in args.stages().items()
            if options.autoscaling_config}


def _deployment_names(args: Any) -> dict[str, str]:
    """stage -> the Serve deployment build_app makes of it (srserve/serving/app.py: name.capitalize())."""
    return {stage: stage.capitalize() for stage in args.stages()}


def _policy(service: dict[str, Any]) -> tuple[StageRatioPolicy, dict[str, Any]]:
    spec = _app(service)["autoscaling_policy"]
    assert spec["policy_function"] == POLICY
    kwargs = spec.get("policy_kwargs") or {}
    return StageRatioPolicy(**kwargs), kwargs  # a misspelt or ill-valued kwarg fails here


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_autoscaled_layouts_use_the_stage_ratio_policy(directory: Path) -> None:
    service, _ = read_rayservice(directory)
    app, args = _app(service), app_args(service)
    if directory in POLICY_TARGETS:
        assert _autoscaled(args), f"{directory}: the GPU layouts autoscale their stages"
    if _autoscaled(args):
        assert app.get("autoscaling_policy", {}).get("policy_function") == POLICY, \
            "a stage with an autoscaling_config is sized by srserve's policy, not Serve's per-deployment default"
    else:  # cpu-demo: one replica each, and it says why
        assert "autoscaling_policy" not in app
        assert service["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling", False) is False


@pytest.mark.parametrize("directory", POLICY_TARGETS, ids=_ids(POLICY_TARGETS))
def test_the_policy_is_what_serve_imports_and_constructs(directory: Path) -> None:
    from ray.serve.config import AutoscalingPolicy
    from ray.serve.schema import ServeDeploySchema

    service, _ = read_rayservice(directory)
    _, kwargs = _policy(service)
    # Serve's schema keeps the application's autoscaling_policy as a plain dict (test_manifests.py validates the
    # whole config); what Serve then does with it: import the path and cloudpickle the class (AutoscalingPolicy),
    # check the kwargs are JSON, and instantiate the class once with them (_resolve_policy_callable).
    (app,) = ServeDeploySchema.model_validate(serve_config(service)).applications
    spec = app.autoscaling_policy
    assert spec == _app(service)["autoscaling_policy"]
    serve_policy = AutoscalingPolicy(**spec)
    assert serve_policy.policy_kwargs == kwargs and not serve_policy.is_default_policy_function()
    try:
        from ray.serve._private.autoscaling_state import _resolve_policy_callable
    except ImportError:  # Serve moved its private helper: our own construction above still stands
        return
    assert isinstance(_resolve_policy_callable(serve_policy), StageRatioPolicy)


@pytest.mark.parametrize("directory", POLICY_TARGETS, ids=_ids(POLICY_TARGETS))
def test_policy_kwargs_fit_the_app(directory: Path) -> None:
    service, _ = read_rayservice(directory)
    args = app_args(service)
    policy, kwargs = _policy(service)
    names = _deployment_names(args)
    if "deployments" in kwargs:
        assert set(kwargs["deployments"]) <= set(names.values()), \
            f"policy deployments {sorted(kwargs['deployments'])} not all in the app ({sorted(names.values())})"
    for stage in _autoscaled(args):  # every autoscaling stage is one the policy knows, as that stage
        assert policy.deployments.get(names[stage]) == stage, f"the policy does not size {names[stage]} as {stage}"
    concurrency = kwargs.get("concurrency") or {}
    assert {"sketch", "render"} <= set(concurrency), "the denoising stages' batch sizes must reach the policy"
    assert set(concurrency) <= set(_autoscaled(args)) & set(STAGES), \
        f"concurrency for {sorted(concurrency)}: only autoscaling stages (a misspelt one would be ignored)"
    for stage, value in concurrency.items():
        assert value == args.stages()[stage].max_batch_size, \
            f"concurrency[{stage}] is {value}, its max_batch_size {args.stages()[stage].max_batch_size}"
    config = policy.config
    assert 0 < config.upscale_delay_s < config.downscale_delay_s, \
        "Serve's delays are 0: the policy's own must damp (up quickly, down slowly: GPU replicas load for minutes)"


@pytest.mark.parametrize("directory", POLICY_TARGETS, ids=_ids(POLICY_TARGETS))
def test_stage_autoscaling_configs_leave_the_delays_to_the_policy(directory: Path) -> None:
    from ray.serve.config import AutoscalingConfig

    service, _ = read_rayservice(directory)
    for stage, raw in _autoscaled(app_args(service)).items():
        assert "initial_replicas" in raw, f"{stage}: say where it starts"
        assert raw["min_replicas"] <= raw["initial_replicas"] <= raw["max_replicas"], stage
        expected = deployment_autoscaling_config(
            raw["min_replicas"], raw["max_replicas"], raw["initial_replicas"],
            metrics_interval_s=raw.get("metrics_interval_s", 2.0),
            look_back_period_s=raw.get("look_back_period_s", 10.0))
        assert raw == expected, f"{stage}: {raw} is not the policy's deployment_autoscaling_config shape {expected}"
        config = AutoscalingConfig(**raw)  # as Serve reads it: no delay, no factor of its own on top of the policy
        assert config.upscale_delay_s == config.downscale_delay_s == 0, stage
        assert config.downscale_to_zero_delay_s is None and not any(raw.get(f) for f in SERVE_FACTORS), stage
        assert config.get_upscaling_factor() == config.get_downscaling_factor() == 1, stage
        assert config.policy.is_default_policy_function(), f"{stage}: no deployment-level policy under the app's"


@pytest.mark.parametrize("directory", POLICY_TARGETS, ids=_ids(POLICY_TARGETS))
def test_serve_applies_the_policys_decision_without_delays_of_its_own(directory: Path) -> None:
    """Two ticks through Serve's application-level wrapper, with contexts from the rendered autoscaling_configs and
    a queue at Sketch: nothing changes before the policy's upscale delay, and at it Sketch grows at once (a Serve
    delay of its own, measured in wall-clock time that does not pass here, would hold it back)."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    service, _ = read_rayservice(directory)
    args = app_args(service)
    policy, _ = _policy(service)
    wrapped = _apply_app_level_autoscaling_config(policy)
    names = _deployment_names(args)
    ids = {stage: DeploymentID(name=names[stage], app_name="srserve") for stage in _autoscaled(args)}
    configs = {stage: AutoscalingConfig(**raw) for stage, raw in _autoscaled(args).items()}
    batch = args.sketch.max_batch_size
    start = {stage: config.initial_replicas for stage, config in configs.items()}
    queued = {"sketch": 4.0 * batch * configs["sketch"].max_replicas}

    def tick(now: float, states: dict[Any, dict]) -> tuple[dict[Any, int], dict[Any, dict]]:
        contexts = {}
        for stage, dep in ids.items():
            config = configs[stage]
            contexts[dep] = AutoscalingContext(
                deployment_id=dep, deployment_name=dep.name, app_name="srserve", current_num_replicas=start[stage],
                target_num_replicas=start[stage], running_replicas=[],
                total_num_requests=float(start[stage] * args.stages()[stage].max_batch_size + queued.get(stage, 0)),
                total_queued_requests=queued.get(stage, 0.0), aggregated_metrics={}, raw_metrics={},
                capacity_adjusted_min_replicas=config.min_replicas,
                capacity_adjusted_max_replicas=config.max_replicas, policy_state=states.get(dep, {}),
                last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)
        return wrapped(contexts)

    decisions, states = tick(1000.0, {})
    assert decisions == {ids[s]: start[s] for s in ids}, "nothing moves before the policy's upscale delay"
    decisions, _ = tick(1000.0 + policy.config.upscale_delay_s, states)
    sketch = configs["sketch"]
    assert start["sketch"] < decisions[ids["sketch"]] <= sketch.max_replicas, decisions
    assert all(configs[s].min_replicas <= n <= configs[s].max_replicas for s, n in
               ((s, decisions[ids[s]]) for s in ids))


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_the_ray_autoscaler_follows_the_policy(directory: Path) -> None:
    service, _ = read_rayservice(directory)
    cluster = service["spec"]["rayClusterConfig"]
    workers = {name: g for name, g in ray_groups(service).items() if name != "head"}
    grows = [name for name, g in workers.items() if g["maxReplicas"] > g["minReplicas"]]
    if not grows:
        return  # cpu-demo: fixed groups (checked above to run without the autoscaler)
    assert cluster.get("enableInTreeAutoscaling") is True, f"groups {grows} can only grow with the Ray autoscaler"
    options = cluster.get("autoscalerOptions") or {}
    assert "idleTimeoutSeconds" in options and "upscalingMode" in options, "set the autoscaler's options deliberately"
    policy, _ = _policy(service)
    idle = options["idleTimeoutSeconds"]
    assert policy.config.upscale_delay_s < idle <= policy.config.downscale_delay_s, \
        "an emptied pod outlives the policy's upscale delay, but the policy's downscale delay judges the load"
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    except ImportError:  # Ray moved its private parser: the fields above still stand
        return
    ray_cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": cluster,
              "metadata": {"name": service["metadata"]["name"],
                           "namespace": service["metadata"].get("namespace", "default")}}
    theirs = _derive_autoscaling_config_from_ray_cr(ray_cr)
    assert math.isclose(theirs["idle_timeout_minutes"] * 60, idle)
    assert theirs["upscaling_speed"] >= sum(g["maxReplicas"] for g in workers.values()), \
        "upscaling is rate-limited (Conservative): the policy's scale-ups would reach the pods a doubling a round"
    for name, group in workers.items():
        node_type = theirs["available_node_types"][name]
        assert (node_type["min_workers"], node_type["max_workers"]) == (group["minReplicas"], group["maxReplicas"])


def test_a_bad_policy_kwarg_fails() -> None:
    """The checks above catch a misspelt or ill-valued knob: StageRatioPolicy refuses it."""
    service, _ = read_rayservice(GPU_OVERLAYS[0])
    _, kwargs = _policy(service)
    with pytest.raises(TypeError):
        StageRatioPolicy(**{**kwargs, "downscale_delay": 300})
    with pytest.raises(ValueError):
        StageRatioPolicy(**{**kwargs, "target_utilization": 1.5})
    with pytest.raises(ValueError):
        StageRatioPolicy(**{**kwargs, "deployments": {"Sketch": "sketching"}})


@pytest.mark.parametrize("directory", POLICY_TARGETS, ids=_ids(POLICY_TARGETS))
def test_srserve_serve_would_accept_the_policy_as_configured(directory: Path) -> None:
    """The checks `srserve serve` makes before Ray starts (runner.check_autoscaling) hold for the rendered config."""
    from srserve.serving.runner import check_autoscaling

    service, _ = read_rayservice(directory)
    assert check_autoscaling(serve_config(service)) is None
