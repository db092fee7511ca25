#!/usr/bin/env python3
"""Render a kustomization directory to a multi-document YAML stream on stdout.

Usage: scripts/kustomize-render.py DIR

For machines without kubectl or kustomize (CI): implements the part of kustomize that
k8s/ uses, and refuses everything else, so it cannot silently render something
different from `kubectl kustomize`:

* `resources`: YAML files and directories holding a kustomization;
* `namespace`: set on every namespaced object;
* `labels` with `pairs` (metadata labels only, as with includeSelectors: false);
* `images`: `name` with `newName` / `newTag` / `digest`, on containers and
  initContainers;
* `patches`: inline or file JSON 6902 patches (a YAML list of add / replace / remove
  operations) selected by `target` kind and name.

Transformers run in kustomize's order (patches, namespace, labels, images), base before
overlay. scripts/validate-k8s.sh compares the output with `kubectl kustomize` when
kubectl is installed.
"""

import copy
import pathlib
import sys

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}

# Kinds that have no namespace (those k8s/ could plausibly use).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "APIService",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


class RenderError(Exception):
    pass


def load_kustomization(directory: pathlib.Path) -> dict:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = directory / name
        if path.is_file():
            with path.open() as f:
                k = yaml.safe_load(f) or {}
            unknown = set(k) - KNOWN_KEYS
            if unknown:
                raise RenderError(f"{path}: unsupported kustomization fields {sorted(unknown)}")
            if k.get("kind", "Kustomization") != "Kustomization":
                raise RenderError(f"{path}: kind must be Kustomization")
            return k
    raise RenderError(f"{directory}: no kustomization.yaml")


def load_documents(path: pathlib.Path) -> list:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: a document is not a Kubernetes object")
    return docs


def pointer_parts(pointer: str) -> list:
    if not pointer.startswith("/"):
        raise RenderError(f"JSON pointer {pointer!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def apply_json6902(obj: dict, ops: list, where: str) -> None:
    if not isinstance(ops, list):
        raise RenderError(f"{where}: only JSON 6902 patches (a list of operations) are supported")
    for op in ops:
        kind, parts = op.get("op"), pointer_parts(op.get("path", ""))
        parent = obj
        for p in parts[:-1]:
            try:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            except (KeyError, IndexError, ValueError) as e:
                raise RenderError(f"{where}: path {op['path']} does not exist") from e
        last = parts[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind in ("replace", "remove"):
            if isinstance(parent, list):
                index = int(last)
                if not 0 <= index < len(parent):
                    raise RenderError(f"{where}: path {op['path']} does not exist")
            elif last not in parent:
                raise RenderError(f"{where}: path {op['path']} does not exist")
            else:
                index = last
            if kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                del parent[index]
        else:
            raise RenderError(f"{where}: unsupported patch op {kind!r}")


def containers(node):
    """Every container and initContainer dict anywhere under node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def set_image(container: dict, rule: dict) -> None:
    image = container.get("image", "")
    name, tag, digest = image, None, None
    if "@" in name:
        name, digest = name.split("@", 1)
    last_slash = name.rfind("/")
    if ":" in name[last_slash + 1 :]:
        name, tag = name.rsplit(":", 1)
    if name != rule["name"]:
        return
    name = rule.get("newName", name)
    if "digest" in rule:
        container["image"] = f"{name}@{rule['digest']}"
    elif "newTag" in rule:
        container["image"] = f"{name}:{rule['newTag']}"
    elif digest:
        container["image"] = f"{name}@{digest}"
    elif tag:
        container["image"] = f"{name}:{tag}"
    else:
        container["image"] = name


def render(directory: pathlib.Path) -> list:
    k = load_kustomization(directory)
    objects = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(load_documents(path))
        else:
            raise RenderError(f"{directory}: resource {entry} not found")

    for i, patch in enumerate(k.get("patches", [])):
        where = f"{directory}: patches[{i}]"
        if set(patch) - {"target", "patch", "path"}:
            raise RenderError(f"{where}: only target plus patch or path are supported")
        target = patch.get("target") or {}
        if set(target) - {"kind", "name"} or not target:
            raise RenderError(f"{where}: target must select by kind and/or name only")
        if "path" in patch:
            ops = yaml.safe_load((directory / patch["path"]).read_text())
        else:
            ops = yaml.safe_load(patch["patch"])
        matched = [
            o
            for o in objects
            if o["kind"] == target.get("kind", o["kind"])
            and o["metadata"].get("name") == target.get("name", o["metadata"].get("name"))
        ]
        if not matched:
            raise RenderError(f"{where}: target {target} matches no object")
        for o in matched:
            apply_json6902(o, ops, where)

    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]

    for i, label in enumerate(k.get("labels", [])):
        if set(label) - {"pairs", "includeSelectors"} or label.get("includeSelectors"):
            raise RenderError(f"{directory}: labels[{i}]: only pairs (no selectors) supported")
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])

    for rule in k.get("images", []):
        if set(rule) - {"name", "newName", "newTag", "digest"}:
            raise RenderError(f"{directory}: images entry {rule} has unsupported fields")
        for o in objects:
            for c in containers(o):
                set_image(c, rule)
    return objects


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        objects = render(pathlib.Path(sys.argv[1]).resolve())
    except (RenderError, OSError, yaml.YAMLError) as e:
        print(f"kustomize-render: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, default_flow_style=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
