"""deploy/k8s: both overlays render (tests/kustomize.py, our kustomize subset), every object
validates against the Kubernetes 1.33 OpenAPI schemas (kubernetes-validate, strict: unknown
fields fail) and every KEDA object against KEDA's schema (tests/data, a hand-written subset
of KEDA's CRD), and the manifests agree with the code: ports, probes, commands, the drain
grace, each stage's stream key and consumer group, hardening, disruption budgets.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from kubernetes_validate import utils as kv

from imagestream.cli import pipeline
from imagestream.common.keys import GROUPS, Keys

from .kustomize import load_yaml, merge, render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
KEDA_SCHEMA = json.loads(
    (Path(__file__).parent / "data" / "keda_v1alpha1_subset.schema.json").read_text()
)
SERVICES = ("api", "ingest", "fetcher", "analyzer", "writer")
#: The environment variable holding each stage's concurrency (= the KEDA target per replica).
CONCURRENCY = {"fetcher": "FETCH_CONCURRENCY", "analyzer": "ANALYZE_CONCURRENCY",
               "writer": "WRITE_BULK_SIZE"}  # fmt: skip
Obj = dict[str, Any]


@pytest.fixture(scope="module", params=["dev", "prod"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(K8S / "overlays" / request.param)


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def config_of(objects: list[Obj]) -> dict[str, str]:
    data: dict[str, str] = by_kind(objects, "ConfigMap")["imagestream-config"]["data"]
    return data


def validate_keda(obj: Obj) -> None:
    jsonschema.validate(obj, KEDA_SCHEMA, cls=jsonschema.Draft202012Validator)
    behavior = (
        obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    )
    if behavior is not None:
        # KEDA hands this to the HPA it creates: check it as the HPA's own field.
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda-hpa-check"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        kv.validate(hpa, KUBERNETES_VERSION, strict=True)


def validate(obj: Obj) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        validate_keda(obj)
    else:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_validates(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    assert objects, name
    errors = []
    for obj in objects:
        try:
            validate(obj)
        except (kv.ValidationError, jsonschema.ValidationError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {by_kind(objects, "Namespace").popitem()[0]}


def test_validators_reject_mistakes(overlay: tuple[str, list[Obj]]) -> None:
    """The checks above can fail: a misspelt field, a bad value, a wrong trigger."""
    _, objects = overlay
    deployment = copy.deepcopy(by_kind(objects, "Deployment")["imagestream-fetcher"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        validate(deployment)
    service = copy.deepcopy(by_kind(objects, "Service")["imagestream-api"])
    service["spec"]["ports"][0]["port"] = "five thousand"
    with pytest.raises(kv.ValidationError):
        validate(service)
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "triggers": [{"type": "redis-streams", "metadata": {"address": "r:6379"}}],
        },
    }
    for broken in (
        {"stream": "s", "lagCount": "5"},  # lag needs a consumer group
        {"stream": "s", "streamLength": "5", "consumerGroup": "g"},  # that would be pending
        {"stream": "s", "streamlength": "5"},  # misspelt
        {"stream": "s", "streamLength": 5},  # metadata values are strings
    ):
        scaled["spec"]["triggers"][0]["metadata"] = {"address": "r:6379", **broken}
        with pytest.raises(jsonschema.ValidationError):
            validate(scaled)
    behaved = copy.deepcopy(scaled)
    behaved["spec"]["triggers"][0]["metadata"] = {"address": "r:6379", "stream": "s"}
    behaved["spec"]["advanced"] = {
        "horizontalPodAutoscalerConfig": {
            "behavior": {"scaleDown": {"policies": [{"type": "Pod"}]}}
        }
    }
    with pytest.raises(kv.ValidationError):
        validate(behaved)


def test_services_match_the_code(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")
    grace = float(config_of(objects)["SHUTDOWN_GRACE_S"])
    for stage in SERVICES:
        deployment = deployments[f"imagestream-{stage}"]
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert container["args"] == ["serve", stage]
        port = 5001 if stage == "api" else pipeline.STAGES[stage].metrics_port
        (declared,) = container["ports"]
        assert declared["containerPort"] == port, stage
        assert container["readinessProbe"]["httpGet"] == {
            "path": "/readyz",
            "port": declared["name"],
        }
        assert container["livenessProbe"]["httpGet"] == {
            "path": "/healthz",
            "port": declared["name"],
        }
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        # Kubernetes kills after the grace period: it must outlast the drain.
        assert pod["spec"]["terminationGracePeriodSeconds"] >= grace + 10, stage
        sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
        assert sources == {"imagestream-config", "imagestream-secrets"}
        service = services[f"imagestream-{stage}"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == declared["name"]


def test_workloads_are_hardened(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    budgets = by_kind(objects, "PodDisruptionBudget").values()
    assert workloads
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        writable = {v["name"] for v in pod.get("volumes", [])} | {
            c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])
        }
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, name
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert all(volume in writable for volume in mounts.values()), name
            if workload["kind"] == "Deployment":
                # A read-only root needs a writable /tmp (exports, temporary files).
                assert "/tmp" in mounts, name
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covered = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        if workload["kind"] == "Deployment":
            assert len(covered) == 1, f"{name}: one PodDisruptionBudget"


def test_each_stage_has_one_autoscaler(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    scaled = by_kind(objects, "ScaledObject")
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    targets = [o["spec"]["scaleTargetRef"]["name"] for o in [*scaled.values(), *hpas.values()]]
    assert sorted(targets) == sorted(f"imagestream-{s}" for s in GROUPS.values()), name
    assert bool(scaled) == (name == "prod") and bool(hpas) == (name == "dev")
    deployments = by_kind(objects, "Deployment")
    for target in targets:
        # The autoscaler owns the replica count: a fixed one would fight it on each apply.
        assert "replicas" not in deployments[target]["spec"], target


def test_keda_scales_each_stage_on_its_stream() -> None:
    objects = render(K8S / "overlays" / "prod")
    config = config_of(objects)
    keys = Keys(config["REDIS_PREFIX"])
    deployments = by_kind(objects, "Deployment")
    auths = by_kind(objects, "TriggerAuthentication")
    secret_keys = set(load_yaml(K8S / "overlays" / "dev" / "secret.example.yaml")[0]["stringData"])
    stream_of = {stage: name for name, stage in GROUPS.items()}
    scaled = by_kind(objects, "ScaledObject")
    assert len(scaled) == len(GROUPS)
    for obj in scaled.values():
        spec = obj["spec"]
        stage = spec["scaleTargetRef"]["name"].removeprefix("imagestream-")
        deployment = deployments[spec["scaleTargetRef"]["name"]]
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == keys.stream(stream_of[stage]), stage
        # The address variable is one the target container gets (KEDA reads it there).
        assert meta["addressFromEnv"] in config
        assert re.fullmatch(r"[^:/]+:\d+", config[meta["addressFromEnv"]])
        for ref in auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]:
            assert ref["name"] == "imagestream-secrets" and ref["key"] in secret_keys
        env = {
            e["name"]: e["value"]
            for e in deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
        }
        if stage in CONCURRENCY:
            assert meta["streamLength"] == env[CONCURRENCY[stage]], stage
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    documented = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert "autoscaling.keda.sh/paused-replicas" in documented


def test_network_policies() -> None:
    objects = render(K8S / "overlays" / "dev")
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["imagestream-default-deny"]
    assert deny["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "imagestream"}
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    fetcher = policies["imagestream-fetcher-egress"]["spec"]["egress"][0]["to"]
    blocked = {cidr for block in fetcher for cidr in block["ipBlock"]["except"]}
    # Cloud metadata and private ranges are unreachable for the fetcher.
    assert {
        "169.254.0.0/16",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fe80::/10",
    } <= blocked
    for store in ("redis", "postgres"):
        sources = policies[store]["spec"]["ingress"][0]["from"]
        assert sources == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "imagestream"}}}
        ]


def test_datastores_only_in_dev_and_no_real_secret() -> None:
    dev, prod = render(K8S / "overlays" / "dev"), render(K8S / "overlays" / "prod")
    assert set(by_kind(dev, "StatefulSet")) == {"redis", "postgres"}
    assert not by_kind(prod, "StatefulSet")
    assert not by_kind(prod, "Secret"), "production secrets are created out of band"
    (secret,) = by_kind(dev, "Secret").values()
    for key, value in secret["stringData"].items():
        # Placeholders only: empty, CHANGE-ME, or a URL whose password is CHANGE-ME (or none).
        if "://" in value:
            assert urlsplit(value).password in (None, "CHANGE-ME"), key
        else:
            assert value in ("", "CHANGE-ME"), key
    redis_args = by_kind(dev, "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"


def test_renderer_merges_like_kustomize() -> None:
    """Strategic merge as kubernetes does it: lists of containers merge by name."""
    env = [{"name": "K", "value": "1"}]
    base = {
        "spec": {
            "containers": [{"name": "a", "image": "x", "env": env}, {"name": "b", "image": "y"}],
            "replicas": 2,
        }
    }
    patch_env = [{"name": "K", "value": "2"}, {"name": "L", "value": "3"}]
    patch = {"spec": {"containers": [{"name": "a", "env": patch_env}], "replicas": None}}
    merged = merge(base, patch)
    assert merged == {
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "image": "x",
                    "env": [{"name": "K", "value": "2"}, {"name": "L", "value": "3"}],
                },
                {"name": "b", "image": "y"},
            ]
        }
    }
