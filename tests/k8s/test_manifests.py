"""Offline validation of k8s/: KubeRay v1.7.0 CRD schemas (defaults applied, plus a strict pass that
catches misspelled fields), built-in kinds with kubernetes-validate, serveConfigV2 with Ray's own schema."""

from __future__ import annotations

import copy
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from deployments.kube import constants, generate, manifests
from moe_core.config import DeploymentConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_CONFIG = "config/deployment.k8s.yaml"
#: The S3 variant: storage on an object store, the node cache, credentials from a Secret or an IAM role.
K8S_S3 = K8S / "s3"
K8S_S3_CONFIG = "config/deployment.k8s-s3.yaml"
CRDS = Path(__file__).parent / "crds"
KINDS = {
    "RayService": "rayservices",
    "RayJob": "rayjobs",
    "RayCluster": "rayclusters",
    "PodMonitor": "podmonitors",
}


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


def _docs(folder: Path = K8S) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


ALL_DOCS = _docs() + [(f"s3/{n}", d) for n, d in _docs(K8S_S3)]


@pytest.mark.parametrize(("name", "doc"), ALL_DOCS, ids=[f"{n}:{d['kind']}" for n, d in ALL_DOCS])
def test_every_manifest_validates(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in KINDS:
        validate_custom(doc)
    else:
        validate_builtin(doc)


@pytest.mark.parametrize("folder", [K8S, K8S_S3], ids=["rwx", "s3"])
def test_kustomization_lists_existing_files(folder: Path) -> None:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    for r in kust["resources"]:
        assert (folder / r).exists(), r


def _cfg() -> DeploymentConfig:
    return DeploymentConfig.from_file(ROOT / K8S_CONFIG)


def _rayservice() -> dict[str, Any]:
    return next(d for _, d in _docs() if d["kind"] == "RayService")


def _rayjob() -> dict[str, Any]:
    return next(d for _, d in _docs() if d["kind"] == "RayJob")


@pytest.mark.parametrize(
    ("kind", "path", "value", "words"),
    [
        (
            "RayService",
            ["spec", "rayClusterConfig", "headGroupSpec", "rayStartParms"],
            {"num-cpus": "0"},
            "rayStartParms",
        ),
        ("RayService", ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replcas"], 1, "replcas"),
        ("RayService", ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"], "many", "many"),
        ("RayService", ["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "0"),
        ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "replcas"], 1, "replcas"),
        ("RayJob", ["spec", "shutdownAfterJobFinishes"], "yes", "yes"),
        ("RayJob", ["spec", "ttlSecondsAfterFinshed"], 3600, "ttlSecondsAfterFinshed"),
    ],
)
def test_planted_mistakes_fail(kind: str, path: list[Any], value: Any, words: str) -> None:
    doc = copy.deepcopy(_rayservice() if kind == "RayService" else _rayjob())
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

    from deployments.app import DYNAMIC_NAME, GATEWAY_NAME
    from moe_core.config import DynamicLive, GatewayLive, LiveSettings

    svc = _rayservice()
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    cfg = _cfg()
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    static, live_in_args = DeploymentConfig.from_static(app["args"]["config"])
    assert live_in_args is None  # live fields travel as user_config only
    assert static.base_model == cfg.base_model and static.merged == cfg.merged
    live = {d["name"]: d["user_config"] for d in app["deployments"]}
    assert set(live) == {GATEWAY_NAME, DYNAMIC_NAME}
    got = LiveSettings(
        gateway=GatewayLive.from_user_config(live[GATEWAY_NAME], GATEWAY_NAME),
        dynamic=DynamicLive.from_user_config(live[DYNAMIC_NAME], DYNAMIC_NAME),
    )
    assert got == LiveSettings.of(cfg)


def test_rayservice_shape() -> None:
    svc = _rayservice()
    rc = svc["spec"]["rayClusterConfig"]
    assert rc["rayVersion"] == ray.__version__
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = rc["workerGroupSpecs"][0]
    res = worker["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
    assert worker["template"]["spec"]["tolerations"] and worker["template"]["spec"]["nodeSelector"]
    cfg = _cfg()
    gpu_max = sum(a.max_replicas for a in cfg.merged_enabled) + cfg.dynamic.max_replicas
    assert worker["maxReplicas"] == gpu_max


def test_rayjob_shape() -> None:
    job = _rayjob()
    assert job["metadata"] == {
        "generateName": "moe-merge-",
        "labels": {"app.kubernetes.io/name": "moe-inference-server", "app.kubernetes.io/component": "merge"},
    }
    spec = job["spec"]
    assert spec["entrypoint"] == (
        "python -m merge_jobs --config /home/ray/app/config/deployment.k8s.yaml --all-merged"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["activeDeadlineSeconds"] == 7200
    assert spec["submissionMode"] == "K8sJobMode"
    rc = spec["rayClusterSpec"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (worker,) = rc["workerGroupSpecs"]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 1
    assert manifests.rayjob(_cfg())["metadata"] == job["metadata"]
    assert (
        (K8S / "rayjob-merge.yaml")
        .read_text()
        .startswith(f"# Generated from {K8S_CONFIG} by `python -m deployments.kube`; do not edit by hand.\n")
    )
    assert "kubectl create -f k8s/rayjob-merge.yaml" in (K8S / "rayjob-merge.yaml").read_text()


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _pods(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [g["template"]["spec"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def test_rayjob_shares_the_cluster_pieces_of_the_rayservice() -> None:
    svc = _rayservice()["spec"]["rayClusterConfig"]
    job = _rayjob()["spec"]["rayClusterSpec"]
    assert job["rayVersion"] == svc["rayVersion"] == ray.__version__
    containers = _containers(svc) + _containers(job)
    assert {c["image"] for c in containers} == {constants.IMAGE}
    hf = [{e["name"]: e for e in c["env"]} for c in containers]
    for env in hf:
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "hf-token",
            "key": "token",
            "optional": True,
        }
        assert env["HF_HOME"] == hf[0]["HF_HOME"]
    storage = [v for p in _pods(svc) + _pods(job) for v in p["volumes"] if v["name"] == "storage"]
    assert len(storage) == len(_pods(svc)) + len(_pods(job)) == 5 and all(v == storage[0] for v in storage)
    assert storage[0]["persistentVolumeClaim"]["claimName"] == "moe-storage"
    mounts = [m for c in containers for m in c["volumeMounts"] if m["name"] == "storage"]
    assert len(mounts) == 5 and all(m == mounts[0] for m in mounts)
    svc_gpu = svc["workerGroupSpecs"][0]["template"]["spec"]
    job_gpu = job["workerGroupSpecs"][0]["template"]["spec"]
    assert job_gpu["nodeSelector"] == svc_gpu["nodeSelector"] == constants.H100_LABEL
    assert job_gpu["tolerations"] == svc_gpu["tolerations"]


def _worker_resources(job: dict[str, Any]) -> dict[str, Any]:
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    res = worker["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"]
    return dict(res["requests"])


def test_rayjob_worker_takes_its_resources_from_the_merge_section() -> None:
    cfg = _cfg()
    assert cfg.merge.gpu > 0
    res = _worker_resources(_rayjob())
    assert float(res["cpu"]) == cfg.merge.cpu
    assert float(res["nvidia.com/gpu"]) == cfg.merge.gpu
    assert res["memory"] == constants.MERGE_WORKER_MEMORY
    worker = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["rayStartParams"]["num-gpus"] == res["nvidia.com/gpu"]


@pytest.mark.parametrize(("gpu", "cpu"), [(2.0, 6.0), (0.5, 2.5), (0.0, 8.0)])
def test_rayjob_follows_other_merge_sizes(gpu: float, cpu: float) -> None:
    base = _cfg()
    cfg = base.model_copy(update={"merge": base.merge.model_copy(update={"gpu": gpu, "cpu": cpu})})
    job = yaml.safe_load(generate.render_rayjob(cfg, K8S_CONFIG))
    validate_custom(job)
    res = _worker_resources(job)
    assert float(res["cpu"]) == cpu
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]
    if gpu:  # whole devices: Ray's fractional request fits on one
        assert int(res["nvidia.com/gpu"]) == math.ceil(gpu)
        assert pod["nodeSelector"] == constants.H100_LABEL and pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in res and "nodeSelector" not in pod and "tolerations" not in pod


def test_no_secret_values_in_the_repository() -> None:
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert "hf_" not in text.lower().replace("hf_home", "").replace("hf_token", "")
    for _, doc in _docs():
        assert doc["kind"] != "Secret"
    assert "secretKeyRef" in text


@pytest.mark.parametrize("filename", list(generate.FILES))
def test_committed_manifest_is_the_generators_output(filename: str) -> None:
    assert (K8S / filename).read_text() == generate.FILES[filename](_cfg(), K8S_CONFIG), (
        f"k8s/{filename} drifted: python -m deployments.kube --out k8s/"
    )


@pytest.mark.parametrize(
    "cmd",
    [
        ["deployments.kube", "--config", K8S_CONFIG, "--check", "k8s/"],
        ["deployments.kube", "--config", K8S_S3_CONFIG, "--check", "k8s/s3/"],
        ["deployments.serve_config", "--config", "config/deployment.yaml", "--check", "config/serve.yaml"],
    ],
    ids=["kube", "kube-s3", "serve_config"],
)
def test_generated_files_are_current(cmd: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_kube_cli_writes_and_checks_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / K8S_CONFIG)
    out = tmp_path / "k8s"
    assert generate.main(["--config", config, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(generate.FILES)
    assert generate.main(["--config", config, "--check", str(out)]) == 0
    job = out / "rayjob-merge.yaml"
    job.write_text(job.read_text().replace("moe-merge-", "moe-merged-"))
    assert generate.main(["--config", config, "--check", str(out)]) == 1
    assert "rayjob-merge.yaml is out of date" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--config", config, "--check", str(out / "rayservice.yaml")])


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod() -> None:
    from deployments.kube.constants import METRICS_PORT

    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    svc = _rayservice()["spec"]["rayClusterConfig"]
    job = yaml.safe_load((K8S / "rayjob-merge.yaml").read_text())["spec"]["rayClusterSpec"]
    for group in [
        svc["headGroupSpec"],
        *svc["workerGroupSpecs"],
        job["headGroupSpec"],
        *job["workerGroupSpecs"],
    ]:
        assert group["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT)
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[port] == METRICS_PORT


def test_grafana_dashboard_queries_only_our_metric_names() -> None:
    """Every ray_moe_* name the dashboard uses is one the deployments define (the e2e test checks the
    scrape has them)."""
    import re

    from deployments import observability

    for cls in (
        observability.GatewayMetrics,
        observability.DynamicMetrics,
        observability.MergedMetrics,
        observability.PromotionMetrics,
    ):
        cls()  # registers its names
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"ray_moe_[a-z_]+", e)}
    defined = set(observability.METRIC_NAMES.values())
    known = defined | {n.removesuffix("_bucket") + s for n in defined for s in ("_bucket", "_count", "_sum")}
    assert used and used <= known, sorted(used - known)
    assert {n for n in defined if "load_failures" not in n} <= used | {
        n for n in known if n.endswith(("_count", "_sum"))
    }, "every metric but load failures is on the dashboard"


def test_api_keys_come_from_a_secret_on_every_rayservice_pod() -> None:
    """Keys on in production: the gateway may run on any pod, each mounts the Secret (never in the repo)."""
    from pathlib import PurePath

    key_file = _cfg().api.key_file
    assert key_file is not None and _cfg().api.keys_required
    svc = _rayservice()["spec"]["rayClusterConfig"]
    for pod in _pods(svc):
        (volume,) = [v for v in pod["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"] == {"secretName": constants.API_KEY_SECRET, "optional": False}
    for container in _containers(svc):
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
        assert mount == {"name": "api-keys", "mountPath": str(PurePath(key_file).parent), "readOnly": True}
        assert "subPath" not in mount  # a rotated Secret reaches the file
    job = _rayjob()["spec"]["rayClusterSpec"]
    assert all(v["name"] != "api-keys" for p in _pods(job) for v in p["volumes"])
    with_env = _cfg().model_copy(update={"api": _cfg().api.model_copy(update={"key_env": "MOE_API_KEY"})})
    env = {
        e["name"]: e
        for e in manifests.rayservice(with_env)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
            "spec"
        ]["containers"][0]["env"]
    }
    assert env["MOE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == constants.API_KEY_SECRET
    local = DeploymentConfig.from_file(ROOT / "config" / "deployment.yaml")
    assert not local.api.keys_required  # off on the embedded default


# ------------------------------------------------------------------------------------------- S3 variant
def _s3_cfg() -> DeploymentConfig:
    return DeploymentConfig.from_file(ROOT / K8S_S3_CONFIG)


def test_s3_config_differs_from_the_volume_config_in_storage_only() -> None:
    rwx, s3 = _cfg().model_dump(), _s3_cfg().model_dump()
    assert [k for k in rwx if rwx[k] != s3[k]] == ["storage"]
    assert s3["storage"]["url"].startswith("s3://") and s3["storage"]["cache_dir"].startswith("/mnt/")


@pytest.mark.parametrize("filename", sorted(generate.files_for(_s3_cfg())))
def test_committed_s3_manifest_is_the_generators_output(filename: str) -> None:
    assert (K8S_S3 / filename).read_text() == generate.files_for(_s3_cfg())[filename](
        _s3_cfg(), K8S_S3_CONFIG
    ), f"k8s/s3/{filename} drifted: python -m deployments.kube --config {K8S_S3_CONFIG} --out k8s/s3/"


def test_s3_variant_reads_the_bucket_through_the_node_cache_with_credentials_from_a_secret_or_a_role() -> (
    None
):
    """No shared volume: the GPU worker pods of the RayService and the merge job mount the node cache
    (hostPath, which only the GPU nodes have) at storage.cache_dir; the heads, which have no node selector
    and may land on any node, an emptyDir there. Every pod runs as the ServiceAccount (an IAM role
    annotation) and may take the keys from the Secret; no key value is in the repository."""
    docs = dict(_docs(K8S_S3))
    cfg = _s3_cfg()
    svc = docs["rayservice.yaml"]["spec"]["rayClusterConfig"]
    job = docs["rayjob-merge.yaml"]["spec"]["rayClusterSpec"]
    pods, containers = _pods(svc) + _pods(job), _containers(svc) + _containers(job)
    assert len(pods) == 5  # head, GPU workers and chandra's GPU workers; the merge job's head and worker
    for pod in pods:
        assert (
            pod["serviceAccountName"] == constants.SERVICE_ACCOUNT
            and pod["automountServiceAccountToken"] is False
        )
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        (cache,) = [v for v in pod["volumes"] if v["name"] == "node-cache"]
        if pod.get("nodeSelector") == constants.H100_LABEL:  # a GPU node, prepared for the hostPath
            assert cache["hostPath"] == {"path": constants.NODE_CACHE_HOST_PATH, "type": "Directory"}
        else:
            assert cache == {"name": "node-cache", "emptyDir": {}}, (
                "a hostPath on a pod that may land anywhere"
            )
    for cluster in (svc, job):
        assert "hostPath" not in str(cluster["headGroupSpec"])
        assert all(
            g["template"]["spec"]["nodeSelector"] == constants.H100_LABEL
            and any("hostPath" in v for v in g["template"]["spec"]["volumes"])
            for g in cluster["workerGroupSpecs"]
        )
    assert "kubectl apply -k k8s/s3/" in (K8S_S3 / "networkpolicy.yaml").read_text()
    assert "kubectl apply -k k8s/`" in (K8S / "networkpolicy.yaml").read_text()
    for c in containers:
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "node-cache"]
        assert mount["mountPath"] == cfg.storage.cache_dir
        env = {e["name"]: e for e in c["env"]}
        for key in constants.S3_SECRET_KEYS:
            assert env[key] == {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": constants.S3_SECRET, "key": key, "optional": True}},
            }
        assert env["HF_HOME"]["value"].startswith(cfg.storage.cache_dir)
    account = docs["serviceaccount.yaml"]
    assert account["metadata"]["name"] == constants.SERVICE_ACCOUNT
    assert set(account["metadata"]["annotations"]) == {"eks.amazonaws.com/role-arn"}
    serve_cfg = yaml.safe_load(docs["rayservice.yaml"]["spec"]["serveConfigV2"])
    storage = serve_cfg["applications"][0]["args"]["config"]["storage"]
    assert storage["url"] == cfg.storage.url and storage["cache_dir"] == cfg.storage.cache_dir
    literal = [
        e["name"] for c in containers for e in c["env"] if e["name"].startswith("AWS_") and "value" in e
    ]
    assert not literal, f"object-store settings with literal values in the manifests: {literal}"
    assert all(d["kind"] != "Secret" for d in docs.values())
    assert "rayjob-merge.yaml" not in yaml.safe_load((K8S_S3 / "kustomization.yaml").read_text())["resources"]
    rwx_pods = _pods(_rayservice()["spec"]["rayClusterConfig"])
    assert all("serviceAccountName" not in p for p in rwx_pods)  # the volume variant is as it was


def test_chandra_runs_on_its_own_gpu_group() -> None:
    """config/deployment.k8s.yaml's further model chandra: a GPU worker group of its own, whose custom
    resource only chandra's replicas ask for (the generated serveConfigV2's app builder adds it)."""
    from deployments.app import model_options

    svc = _rayservice()["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in svc["workerGroupSpecs"]}
    group = groups["model-chandra"]
    assert json.loads(group["rayStartParams"]["resources"]) == {"model-chandra": 1}
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "resources" not in groups["h100"]["rayStartParams"]
    cfg = DeploymentConfig.from_file(ROOT / "config" / "deployment.k8s.yaml")
    assert cfg.models[0].model is not None and cfg.models[0].model.id == "datalab-to/chandra"
    assert cfg.model_limits("chandra").max_completion_tokens == 12384
    options = model_options(cfg, "chandra")["ray_actor_options"]
    assert options["resources"] == {"model-chandra": 1} and options["num_gpus"] == 1
