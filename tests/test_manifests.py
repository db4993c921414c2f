"""The deployment files: Kubernetes manifests (k8s/) and monitoring (deployments/; Serve configs there:
test_serve_configs.py, the drain hook: test_drain_hook.py).

Pure Python and fast: no cluster, no Ray runtime. Each kustomization is rendered here by applying its patches (the
subset of kustomize the manifests use; cross-checked against `kubectl kustomize` where kubectl is installed), then
every RayService is checked the way KubeRay, Ray and srserve would read it: serveConfigV2 against Ray Serve's
schema and `AppArgs`, each worker group's advertised resources with the Ray autoscaler's own parser, the pools
the stages ask for against the groups that advertise them, pod counts against the Serve autoscaling bounds,
graceful shutdown against the pods' grace periods, volumes against the paths in the args; the monitoring kustomization
and PodMonitors scrape Ray's metrics ports (the dashboard itself: test_monitoring.py).
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kustomize_render import by_key, kustomization, render
from rayservice import (advertised_resources, app_args, containers, demand, placement, ray_groups,
                        read_rayservice, replica_bounds, serve_config)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DEPLOYMENTS = ROOT / "deployments"
MONITORING = DEPLOYMENTS / "monitoring"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
RAYSERVICE_TARGETS = [K8S / "base", *OVERLAYS]
WRITERS = ("decode", "colocated")  # the deployments that write the videos (AppArgs.stages() names)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


# --- YAML files --------------------------------------------------------------------------------------------------

YAML_FILES = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml"), *DEPLOYMENTS.rglob("*.yaml"),
                     *DEPLOYMENTS.rglob("*.yml")])


def test_there_is_something_to_check() -> None:
    assert (K8S / "base" / "kustomization.yaml").is_file()
    assert {p.name for p in OVERLAYS} >= {"wan2.1-14b-1.3b", "cogvideox-5b-2b", "cpu-demo"}
    assert len(YAML_FILES) > 10


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: empty"


# --- kustomizations (rendered by kustomize_render.py) -----------------------------------------------------------


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_kustomization_references_exist(directory: Path) -> None:
    kust = kustomization(directory)
    for resource in kust.get("resources", []):
        target = (directory / resource).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{directory}: {resource} missing"
    for patch in kust.get("patches", []):
        assert "path" in patch or "patch" in patch, f"{directory}: a patch with neither path nor patch"
        if "path" in patch:
            assert (directory / patch["path"]).is_file(), f"{directory}: patch {patch['path']} missing"
    for generator in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        for entry in generator.get("files", []):
            assert (directory / entry.split("=")[-1]).is_file(), f"{directory}: {entry} missing"
    unknown = set(kust) - {"apiVersion", "kind", "namespace", "resources", "patches", "images",
                           "configMapGenerator", "secretGenerator", "generatorOptions"}
    assert not unknown, f"{directory}: kustomize features this test does not render: {unknown}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_render_agrees_with_kubectl_kustomize(directory: Path) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = by_key([d for d in yaml.safe_load_all(result.stdout) if d])
    ours = by_key(render(directory))
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert theirs[key] == ours[key], f"{directory}: {key} renders differently"


# --- the RayService ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_serve_config_is_valid_for_ray_serve_and_appargs(directory: Path) -> None:
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    service, _ = read_rayservice(directory)
    config = serve_config(service)
    ServeDeploySchema.model_validate(config)
    args = app_args(service)
    # What build_app hands to Serve for each deployment must be valid Serve deployment options (this also
    # validates each autoscaling_config with Ray's AutoscalingConfig).
    for name, options in args.stages().items():
        DeploymentSchema.model_validate({"name": name.capitalize(), **options.deployment_options()})
    DeploymentSchema.model_validate({"name": "Ingress", **args.ingress.deployment_options(args.retry_after_s)})
    assert config["http_options"]["port"] == 8000


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_worker_groups_advertise_the_pools_the_args_reference(directory: Path) -> None:
    service, _ = read_rayservice(directory)
    args = app_args(service)
    groups = ray_groups(service)
    advertised = {name: advertised_resources(group, name == "head") for name, group in groups.items()}
    referenced = {options.pool for options in args.stages().values() if options.pool}
    assert referenced, "no stage names a pool"
    for pool in referenced:
        owners = [name for name, cap in advertised.items() if cap.get(pool)]
        assert len(owners) == 1 and owners[0] != "head", f"pool {pool} is advertised by {owners}"
    for name, cap in advertised.items():
        custom = set(cap) - {"CPU", "GPU"}
        if name != "head":
            assert custom and custom <= referenced, f"group {name} advertises {custom}, args reference {referenced}"
            assert cap["CPU"] == 0, f"group {name}: num-cpus must be 0 (CPU-asking replicas belong on the head)"
    placed = placement(service)
    assert {placed["sketch"], placed["render"]} == {"sketch", "render"}


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_pod_counts_match_the_serve_autoscaling_bounds(directory: Path) -> None:
    service, _ = read_rayservice(directory)
    args = app_args(service)
    cluster = service["spec"]["rayClusterConfig"]
    groups = ray_groups(service)
    placed = placement(service)
    autoscaled = any(o.autoscaling_config for o in args.stages().values())
    assert cluster.get("enableInTreeAutoscaling", False) == autoscaled, \
        "Serve autoscaling needs the Ray autoscaler to add pods (and without it, fixed replica counts)"
    for name, group in groups.items():
        if name == "head":
            continue
        capacity = advertised_resources(group, False)
        stages = [s for s, g in placed.items() if g == name and s in args.stages()]
        assert stages, f"group {name} hosts no stage"
        for bound, field in ((0, "minReplicas"), (1, "maxReplicas")):
            need: dict[str, float] = {}
            for stage in stages:
                options = args.stages()[stage]
                count = replica_bounds(options)[bound]
                for key, amount in demand(options).items():
                    need[key] = need.get(key, 0.0) + amount * count
            pods = max(math.ceil(need[k] / capacity[k] - 1e-9) for k in need if need[k] > 0 and k != "CPU")
            assert group[field] == pods, f"{name}.{field} is {group[field]}; {stages} need {need}: {pods} pods"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        if capacity["GPU"]:
            for stage in stages:  # a pool unit is a GPU of the group
                options = args.stages()[stage]
                assert options.num_gpus == options.pool_amount * capacity["GPU"] / capacity[options.pool], stage


def _drain_deadline(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[1].endswith("drain_node.py") and "--deadline-s" in command, command
    return int(command[command.index("--deadline-s") + 1])


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_graceful_shutdown_lets_a_video_finish(directory: Path) -> None:
    service, docs = read_rayservice(directory)
    args = app_args(service)
    placed = placement(service)
    for name, group in ray_groups(service).items():
        if name == "head":
            continue
        spec = group["template"]["spec"]
        (container,) = containers(group["template"])
        longest = max(args.stages()[s].graceful_shutdown_timeout_s for s, g in placed.items()
                      if g == name and s in args.stages())
        deadline = _drain_deadline(container)
        assert deadline >= longest, f"{name}: drain deadline {deadline} s < graceful_shutdown_timeout_s {longest}"
        assert spec["terminationGracePeriodSeconds"] >= deadline + 30, f"{name}: grace period shorter than drain"
        script_dir = str(PurePosixPath(container["lifecycle"]["preStop"]["exec"]["command"][1]).parent)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == script_dir]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert ("ConfigMap", volume["configMap"]["name"]) in docs, "the drain script's ConfigMap is missing"


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_probes_ports_and_service(directory: Path) -> None:
    service, _ = read_rayservice(directory)
    port = serve_config(service)["http_options"]["port"]
    groups = ray_groups(service)
    (head,) = containers(groups["head"]["template"])
    # KubeRay submits serveConfigV2 only to a Ready head: an app-level readiness probe there would never pass.
    assert "readinessProbe" not in head
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == port
    for name, group in groups.items():
        if name == "head":
            continue
        (container,) = containers(group["template"])
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "srserve"
    assert service["spec"]["serveService"]["spec"]["ports"] == [{"name": "serve", "port": port}]
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}  # see rayservice.yaml: one job-store writer


def _mounts(group: dict[str, Any], docs: dict) -> list[tuple[str, bool, str | None]]:
    """(mountPath, read-only, PVC access mode or None) of the Ray container of a group."""
    spec = group["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = []
    for mount in containers(group["template"])[0].get("volumeMounts", []):
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        mode = None
        if claim:
            pvc = docs.get(("PersistentVolumeClaim", claim["claimName"]))
            assert pvc is not None, f"PVC {claim['claimName']} is not part of the rendered manifests"
            (mode,) = pvc["spec"]["accessModes"]
        out.append((mount["mountPath"], bool(mount.get("readOnly")), mode))
    return out


def _mounted(path: str, mounts: list[tuple[str, bool, str | None]]) -> tuple[str, bool, str | None] | None:
    hits = [m for m in mounts if PurePosixPath(path).is_relative_to(m[0])]
    return max(hits, key=lambda m: len(m[0])) if hits else None


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_paths_in_the_args_are_on_the_right_volumes(directory: Path) -> None:
    service, docs = read_rayservice(directory)
    args = app_args(service)
    groups = ray_groups(service)
    placed = placement(service)
    mounts = {name: _mounts(group, docs) for name, group in groups.items()}

    store = _mounted(args.job_store_path, mounts["head"])
    assert store and store[2] == "ReadWriteOnce" and not store[1], \
        "the SQLite job store belongs on a writable ReadWriteOnce volume of the head"

    if "://" not in args.artifacts_url:  # an fsspec URL (s3://...) needs no volume
        users = {placed[s] for s in args.stages() if s in WRITERS} | {"head"}  # Decode writes, Ingress reads
        for name in users:
            found = _mounted(args.artifacts_url, mounts[name])
            assert found and not found[1], f"{name} must mount {args.artifacts_url} read-write"
            if len(users) > 1:
                assert found[2] == "ReadWriteMany", "artifacts shared by several pods need a ReadWriteMany volume"

    # API keys (issue 11): the Ingress, on the head, reads them from a mounted Secret; Ray's token auth is on.
    assert args.auth is not None, "a cluster deployment must require API keys"
    spec = groups["head"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    keys = [m for m in containers(groups["head"]["template"])[0].get("volumeMounts", [])
            if PurePosixPath(args.auth.api_keys_file).is_relative_to(m["mountPath"])]
    assert len(keys) == 1 and keys[0].get("readOnly") and "secret" in volumes[keys[0]["name"]], \
        f"{args.auth.api_keys_file} must be on a read-only Secret volume of the head"
    assert service["spec"]["rayClusterConfig"].get("authOptions", {}).get("mode") == "token"

    model = args.model
    if model is not None and not isinstance(model, str):
        paths = [p for p in (model.base_path, model.sketch_transformer, model.render_transformer,
                             model.render_base_path) if p]
        for name in {placed[s] for s in args.stages()} | {"head"}:  # the Ingress reads the model's configs
            for path in paths:
                found = _mounted(path, mounts[name])
                assert found and found[1], f"{name}: {path} must be on a read-only model volume"


@pytest.mark.parametrize("directory", RAYSERVICE_TARGETS, ids=_ids(RAYSERVICE_TARGETS))
def test_network_policies_expose_only_the_serve_port(directory: Path) -> None:
    service, docs = read_rayservice(directory)
    port = serve_config(service)["http_options"]["port"]
    policies = [d for (kind, _), d in docs.items() if kind == "NetworkPolicy"]
    assert policies
    open_ports: set[int] = set()
    for policy in policies:
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "srserve"
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            ports = {p["port"] for p in rule.get("ports", [])}
            if not sources:
                assert ports, "a rule open to every source must name its ports"
                open_ports |= ports
            elif all(set(s) == {"podSelector"} and s["podSelector"]["matchLabels"] ==
                     {"app.kubernetes.io/part-of": "srserve"} for s in sources):
                continue  # Ray's internal traffic, between srserve's own pods
            else:
                assert ports, "a rule for other sources (the operator, Prometheus) must name its ports"
    assert open_ports == {port}


# --- monitoring (the dashboard and Prometheus config are checked in test_monitoring.py) ----------------------

def test_podmonitors_scrape_the_ray_metrics_ports() -> None:
    docs = render(K8S / "monitoring")
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert monitors, "no PodMonitor"
    ports = {e["port"] for m in monitors.values() for e in m["spec"]["podMetricsEndpoints"]}
    assert "metrics" in ports
    service, _ = read_rayservice(K8S / "base")
    for name, group in ray_groups(service).items():
        names = {p["name"]: p["containerPort"] for p in containers(group["template"])[0]["ports"]}
        assert names["metrics"] == 8080, f"{name}: Ray's metrics port"
        for monitor in monitors.values():
            selector = monitor["spec"]["selector"]["matchLabels"]
            labels = {**group["template"]["metadata"]["labels"],
                      "ray.io/node-type": "head" if name == "head" else "worker"}
            if all(labels.get(k) == v for k, v in selector.items()):
                for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                    assert endpoint["port"] in names, f"{monitor['metadata']['name']}: {name} has no port " \
                                                      f"{endpoint['port']}"
