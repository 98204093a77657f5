"""Offline validation of k8s/: KubeRay v1.7.0 CRD schemas (defaults applied, plus a strict pass that
catches misspelled fields), built-in kinds with kubernetes-validate, serveConfigV2 with Ray's own schema."""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from deployments.app import DYNAMIC_NAME, ROUTER_NAME
from moe_core.config import DeploymentConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = Path(__file__).parent / "crds"
KINDS = {"RayService": "rayservices", "RayJob": "rayjobs", "RayCluster": "rayclusters"}


def _schema(kind: str) -> dict[str, Any]:
    with gzip.open(CRDS / f"{KINDS[kind]}.v1.json.gz") as f:
        return dict(json.load(f)["schema"])


def _normalise(doc: Any, schema: dict[str, Any]) -> Any:
    """What the API server does before validating: drop nulls, apply defaults."""
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        out = {k: _normalise(v, props.get(k, {})) for k, v in doc.items() if v is not None}
        for k, sub in props.items():
            if k not in out and "default" in sub:
                out[k] = copy.deepcopy(sub["default"])
        return out
    if isinstance(doc, list):
        return [_normalise(x, schema.get("items", {})) for x in doc]
    return doc


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are declared, so a misspelled field fails."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


def validate_custom(doc: dict[str, Any]) -> None:
    schema = _schema(doc["kind"])
    body = _normalise(doc, schema)
    jsonschema.Draft202012Validator(schema).validate(body)
    jsonschema.Draft202012Validator(_strict(schema)).validate(body)


def validate_builtin(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30", strict=True)


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


@pytest.mark.parametrize(("name", "doc"), _docs(), ids=[f"{n}:{d['kind']}" for n, d in _docs()])
def test_every_manifest_validates(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in KINDS:
        validate_custom(doc)
    else:
        validate_builtin(doc)


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for r in kust["resources"]:
        assert (K8S / r).exists(), r


def _rayservice() -> dict[str, Any]:
    return next(d for _, d in _docs() if d["kind"] == "RayService")


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParms"], {"num-cpus": "0"}, "rayStartParms"),
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replcas"], 1, "replcas"),
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"], "many", "many"),
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "0"),
    ],
)
def test_planted_mistakes_fail(path: list[Any], value: Any, words: str) -> None:
    doc = copy.deepcopy(_rayservice())
    node: Any = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=words):
        validate_custom(doc)


def test_pvc_wrong_type_fails() -> None:
    import kubernetes_validate

    pvc = next(d for _, d in _docs() if d["kind"] == "PersistentVolumeClaim")
    bad = copy.deepcopy(pvc)
    bad["spec"]["accessModes"] = "ReadWriteMany"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(bad)
    bad = copy.deepcopy(pvc)
    bad["spec"]["acessModes"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(bad)


def test_serve_config_v2_is_ours_and_valid() -> None:
    from ray.serve.schema import ServeDeploySchema

    svc = _rayservice()
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    cfg = DeploymentConfig.from_file(ROOT / "config" / "deployment.k8s.yaml")
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    static = DeploymentConfig.from_static(app["args"]["config"])
    assert static.base_model == cfg.base_model and static.merged == cfg.merged
    names = {d["name"] for d in app["deployments"]}
    assert names <= {ROUTER_NAME, DYNAMIC_NAME}
    live = {d["name"]: d["user_config"] for d in app["deployments"]}
    assert live[DYNAMIC_NAME]["adapters"] == cfg.dynamic.adapters
    assert set(live[ROUTER_NAME]["dynamic_adapters"]) | {a.name for a in cfg.merged_enabled} >= set(
        cfg.router.labels.values()
    )


def test_rayservice_shape() -> None:
    svc = _rayservice()
    rc = svc["spec"]["rayClusterConfig"]
    assert rc["rayVersion"] == ray.__version__
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = rc["workerGroupSpecs"][0]
    res = worker["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
    assert worker["template"]["spec"]["tolerations"] and worker["template"]["spec"]["nodeSelector"]
    cfg = DeploymentConfig.from_file(ROOT / "config" / "deployment.k8s.yaml")
    gpu_max = sum(a.max_replicas for a in cfg.merged_enabled) + cfg.dynamic.max_replicas
    assert worker["maxReplicas"] == gpu_max
    job = next(d for _, d in _docs() if d["kind"] == "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_no_secret_values_in_the_repository() -> None:
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert "hf_" not in text.lower().replace("hf_home", "").replace("hf_token", "")
    for _, doc in _docs():
        assert doc["kind"] != "Secret"
    assert "secretKeyRef" in text


def test_generated_files_are_current() -> None:
    for cmd in (
        [
            "-m",
            "deployments.kube",
            "--config",
            "config/deployment.k8s.yaml",
            "--check",
            "k8s/rayservice.yaml",
        ],
        [
            "-m",
            "deployments.serve_config",
            "--config",
            "config/deployment.yaml",
            "--check",
            "config/serve.yaml",
        ],
    ):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
