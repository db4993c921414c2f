"""A RayService of k8s/ read the way KubeRay, the Ray autoscaler and srserve read it: its Serve config and
`AppArgs`, its groups' advertised resources (cross-checked with the autoscaler's own parser), where each stage's
replicas must land. Used by test_manifests.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from kustomize_render import by_key, render


def read_rayservice(directory: Path) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    docs = by_key(render(directory))
    services = [d for (kind, _), d in docs.items() if kind == "RayService"]
    assert len(services) == 1, f"{directory}: expected one RayService"
    assert services[0]["apiVersion"] == "ray.io/v1"
    return services[0], docs


def serve_config(service: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert isinstance(config, dict)
    return config


def app_args(service: dict[str, Any]):
    from srserve.serving.args import AppArgs

    (app,) = serve_config(service)["applications"]
    assert app["import_path"] == "srserve.serving:build_app"
    args = AppArgs.model_validate(app.get("args") or {})
    assert args.mode == "disaggregated", "the KubeRay layouts put the stages on separate pools"
    return args


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def ray_groups(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] not in groups
        groups[group["groupName"]] = group
    return groups


def advertised_resources(group: dict[str, Any], is_head: bool) -> dict[str, float]:
    """A group's per-pod Ray resources, read the way the Ray autoscaler reads them (and by its own parser)."""
    params = group["rayStartParams"]
    resources: dict[str, float] = {}
    assert "num-cpus" in params, "set num-cpus explicitly: it decides where CPU-asking replicas go"
    resources["CPU"] = float(params["num-cpus"])
    limits = containers(group["template"])[0].get("resources", {}).get("limits", {})
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", "0"))
    resources["GPU"] = float(gpus)
    if "resources" in params:
        raw = params["resources"]
        # KubeRay passes it to `ray start --resources=<raw>` through a shell; the Ray autoscaler strips one pair
        # of quotes and the backslashes, then wants a JSON object of integers.
        assert raw.startswith('"') and raw.endswith('"'), f"resources must be written '\"{{...}}\"', got {raw!r}"
        custom = json.loads(raw[1:-1].replace("\\", ""))
        assert all(isinstance(v, int) for v in custom.values()), f"custom resources must be integers: {custom}"
        resources.update({k: float(v) for k, v in custom.items()})
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
    except ImportError:  # Ray moved its private parser: our reading above still stands
        return resources
    theirs = _get_ray_resources_from_group_spec(group, is_head)
    for key, value in resources.items():
        assert float(theirs.get(key, 0)) == value, f"the Ray autoscaler reads {key}={theirs.get(key)}, not {value}"
    return resources


def fits(demand: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(capacity.get(k, 0.0) + 1e-9 >= v for k, v in demand.items() if v > 0)


def demand(options: Any) -> dict[str, float]:
    return {"CPU": options.num_cpus, "GPU": options.num_gpus, **options.resources_needed()}


def replica_bounds(options: Any) -> tuple[int, int]:
    if options.autoscaling_config is not None:
        from ray.serve.config import AutoscalingConfig

        config = AutoscalingConfig(**options.autoscaling_config)
        return config.min_replicas, config.max_replicas
    return options.num_replicas, options.num_replicas


def placement(service: dict[str, Any]) -> dict[str, str]:
    """stage -> the group its replicas must run on (exactly one group may fit each)."""
    args = app_args(service)
    groups = ray_groups(service)
    capacity = {name: advertised_resources(group, name == "head") for name, group in groups.items()}
    placed = {}
    for stage, options in args.stages().items():
        fitting = [name for name, cap in capacity.items() if fits(demand(options), cap)]
        assert len(fitting) == 1, f"{stage} ({demand(options)}) fits on {fitting or 'no group'}; want exactly one"
        placed[stage] = fitting[0]
    ingress = [n for n, cap in capacity.items() if fits({"CPU": args.ingress.num_cpus}, cap)]
    assert args.ingress.num_cpus > 0 and ingress == ["head"], \
        f"the Ingress must ask for CPU so that it lands on the head only (fits on {ingress})"
    store = {"CPU": args.job_store_num_cpus, **args.job_store_resources}
    assert [n for n, cap in capacity.items() if fits(store, cap)] == ["head"], "the JobStore must be pinned"
    placed["ingress"] = placed["jobstore"] = "head"
    return placed
