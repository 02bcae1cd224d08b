"""A small renderer for the subset of kustomize that deploy/k8s uses (no kustomize binary
and no maintained kustomize port on PyPI for Python 3.11 here).

Supported, with kustomize's semantics for what we use:
* ``resources``: YAML files and directories holding a kustomization (rendered first);
* ``components`` (``kind: Component``), applied after the resources, in order;
* ``namespace``: set on every namespaced object;
* ``labels`` with ``pairs``, ``includeSelectors: false`` and ``includeTemplates``;
* ``images``: ``newName`` / ``newTag`` on the containers of pod templates;
* ``patches`` with ``path``: strategic-merge patches, target taken from the patch's
  kind and name; lists merge by kubernetes' patch keys (containers/env/volumes by name,
  volumeMounts by mountPath, ports by containerPort), other lists are replaced.

Anything else in a kustomization raises, so a feature we start using is noticed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED = {
    "apiVersion", "kind", "resources", "components", "namespace", "labels", "images", "patches",
}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


class KustomizeError(Exception):
    pass


def load_yaml(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[Obj]:
    kustomization = _kustomization(directory)
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        objects += _resource(directory / entry)
    for entry in kustomization.get("components", []):
        objects = _apply_component(directory / entry, objects)
    return _transform(directory, kustomization, objects)


def _kustomization(directory: Path) -> Obj:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            docs = load_yaml(directory / name)
            if len(docs) != 1:
                raise KustomizeError(f"{directory / name}: expected one document")
            return docs[0]
    raise KustomizeError(f"{directory}: no kustomization file")


def _resource(path: Path) -> list[Obj]:
    if path.is_dir():
        if _kustomization(path).get("kind") == "Component":
            raise KustomizeError(f"{path}: a Component listed under resources")
        return render(path)
    return load_yaml(path)


def _apply_component(directory: Path, objects: list[Obj]) -> list[Obj]:
    kustomization = _kustomization(directory)
    if kustomization.get("kind") != "Component":
        raise KustomizeError(f"{directory}: listed under components but is not a Component")
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    added: list[Obj] = []
    for entry in kustomization.get("resources", []):
        added += _resource(directory / entry)
    # A component's transformers apply to everything accumulated so far, its own too.
    return _transform(directory, kustomization, objects + added)


def _transform(directory: Path, kustomization: Obj, objects: list[Obj]) -> list[Obj]:
    objects = [copy.deepcopy(o) for o in objects]
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{directory}: only patches with a path are supported")
        for patch in load_yaml(directory / patch_entry["path"]):
            kind, name = patch["kind"], patch["metadata"]["name"]
            target = _find(objects, kind, name)
            if target is None:
                raise KustomizeError(f"{directory}: patch target {kind}/{name} not found")
            index = objects.index(target)
            objects[index] = merge(target, patch)
    for label_entry in kustomization.get("labels", []):
        if label_entry.get("includeSelectors"):
            raise KustomizeError(f"{directory}: labels with includeSelectors are not supported")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_entry["pairs"])
            template = _pod_template(obj)
            if label_entry.get("includeTemplates") and template is not None:
                template.setdefault("metadata", {}).setdefault("labels", {}).update(
                    label_entry["pairs"]
                )
    for image in kustomization.get("images", []):
        for obj in objects:
            template = _pod_template(obj)
            if template is None:
                continue
            for container in _containers(template["spec"]):
                container["image"] = _retag(container["image"], image)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    _check_unique(directory, objects)
    return objects


def _find(objects: list[Obj], kind: str, name: str) -> Obj | None:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    return None


def _check_unique(directory: Path, objects: list[Obj]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        ident = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if ident in seen:
            raise KustomizeError(f"{directory}: {ident} defined twice")
        seen.add(ident)


def _pod_template(obj: Obj) -> Obj | None:
    if obj.get("kind") in POD_TEMPLATE_KINDS:
        template: Obj = obj["spec"]["template"]
        return template
    return None


def _containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def _retag(reference: str, image: Obj) -> str:
    name, _, tag = reference.partition(":")
    if name != image["name"]:
        return reference
    name = image.get("newName", name)
    tag = str(image.get("newTag", tag))
    return f"{name}:{tag}" if tag else name


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (the subset described above)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, b in enumerate(out_list) if b.get(key) == item.get(key)), None)
            if match is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[match] = merge(out_list[match], item)
        return out_list
    return copy.deepcopy(patch)
