"""A small kustomize: renders a kustomization (resources, ConfigMap generators, JSON 6902 and strategic-merge
patches, namespace, images) the way `kustomize build` does for the features srserve's manifests use. Used by
the manifest tests; `test_render_agrees_with_kubectl_kustomize` cross-checks it where kubectl is installed."""
from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

NAMESPACED_EXEMPT = {"Namespace"}


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add / remove / replace / test."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "test":
                assert node[index] == op["value"], f"patch test failed at {op['path']}"
            elif kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise AssertionError(f"unsupported op {kind}")
        else:
            if kind == "test":
                assert node[last] == op["value"], f"patch test failed at {op['path']}: {node.get(last)!r}"
            elif kind in ("add", "replace"):
                assert kind == "add" or last in node, f"replace of a missing {op['path']}"
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise AssertionError(f"unsupported op {kind}")
    return doc


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 (what kustomize's strategic merge amounts to for the maps these patches touch)."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    checks = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group, "version": version}
    return all(checks[key] == value for key, value in target.items() if key in checks)


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    for image in images:
                        if container.get("image", "").split(":")[0] == image["name"]:
                            name = image.get("newName", image["name"])
                            container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _wrapped(encoded: str, width: int = 70) -> str:
    """kustomize writes a long base64 value as lines of 70 characters (a YAML block: newline-terminated)."""
    if len(encoded) <= width:
        return encoded
    return "".join(encoded[i:i + width] + "\n" for i in range(0, len(encoded), width))


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents `kustomize build directory` would produce (for the features these manifests use)."""
    kust = kustomization(directory)
    docs: list[dict[str, Any]] = []
    for resource in kust.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    options = kust.get("generatorOptions", {})
    for generator in kust.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, name = entry.rpartition("=")
            data[key or Path(name).name] = (directory / name).read_text()
        meta: dict[str, Any] = {"name": generator["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        assert options.get("disableNameSuffixHash"), "hashed ConfigMap names are not rendered here"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for generator in kust.get("secretGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, name = entry.rpartition("=")
            data[key or Path(name).name] = _wrapped(base64.b64encode((directory / name).read_bytes()).decode())
        assert (generator.get("options") or options).get("disableNameSuffixHash"), \
            "hashed Secret names are not rendered here"
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "data": data,
                     "type": "Opaque"})
    for patch in kust.get("patches", []):
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        loaded = [d for d in yaml.safe_load_all(text) if d is not None]
        if len(loaded) == 1 and isinstance(loaded[0], list):  # JSON 6902
            targets = [d for d in docs if _matches(d, patch["target"])]
            assert targets, f"{directory}: patch {patch} matches nothing"
            for doc in targets:
                _json_patch(doc, loaded[0])
            continue
        for smp in loaded:  # strategic merge, one document per resource
            index = next((i for i, d in enumerate(docs) if d["kind"] == smp["kind"]
                          and d["metadata"]["name"] == smp["metadata"]["name"]), None)
            assert index is not None, f"{directory}: patch for {smp['kind']}/{smp['metadata']['name']} " \
                                      "matches nothing"
            if smp.get("$patch") == "delete":
                del docs[index]
            else:
                docs[index] = _merge_patch(docs[index], smp)
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in NAMESPACED_EXEMPT:
                doc["metadata"]["namespace"] = kust["namespace"]
    if "images" in kust:
        _set_images(docs, kust["images"])
    return docs


def by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(keyed) == len(docs), "two resources with the same kind and name"
    return keyed
