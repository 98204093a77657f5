"""Generate k8s/: the KubeRay RayService (whose serveConfigV2 is our Serve config) and the merge RayJob.

    python -m deployments.kube --config config/deployment.k8s.yaml --out k8s/
    python -m deployments.kube --config config/deployment.k8s.yaml --check k8s/
    python -m deployments.kube --config config/deployment.k8s-s3.yaml --out k8s/s3/    # storage on S3

``--out``/``--check`` name the directory holding rayservice.yaml, rayjob-merge.yaml and podmonitor.yaml;
one invocation writes (or checks) all three. The two manifests are built from the same pieces (image, env with the Hugging
Face token secret, the shared volume, the H100 node selector and GPU toleration, rayVersion), so they
cannot drift apart. With API keys on in the config (``api.key_file``/``api.key_env``), every RayService
pod gets them from the Secret ``moe-api-keys`` (a mounted folder, so a rotated key applies without a
restart; an environment variable for ``key_env``); the Secret itself is never in the repository.

Two storage variants, chosen by ``storage.url``: a path is the ReadWriteMany volume (k8s/storage.yaml)
mounted there on every pod; ``s3://`` has no shared volume: the GPU worker pods mount the node cache (a
hostPath on the GPU node's local disk, ``storage.cache_dir``; only the GPU nodes are prepared for it), the
head and any CPU worker an emptyDir there instead (they may land on any node); every pod takes the object
store's credentials from the Secret ``moe-s3-credentials`` (optional: with an IAM role instead, annotate
the ServiceAccount this generates) and runs as that ServiceAccount.

Sizing assumptions (Qwen3-VL-8B-Instruct in bf16 on H100 80 GB): ~17 GB of weights per replica, one
replica per GPU; worker pods of 1 GPU, 12 CPUs and 96 GiB of memory (model load, image decoding,
safetensors page cache); the head runs no replicas (num-cpus 0). The merge job's worker takes its GPUs
and CPUs from the config's ``merge:`` section and 96 GiB of memory (see MERGE_WORKER_MEMORY).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import ray
import yaml

from deployments.serve_config import serve_config, write_or_check
from moe_core.config import DeploymentConfig

__all__ = [
    "FILES",
    "IMAGE",
    "S3_FILES",
    "files_for",
    "podmonitor",
    "rayjob",
    "rayservice",
    "render_rayjob",
    "render_rayservice",
    "serviceaccount",
]

NAME = "moe-inference-server"
IMAGE = "ghcr.io/moe-inference-server/moe-inference-server:0.1.0"
APP_DIR = "/home/ray/app"  # the image's WORKDIR; config/ is copied there (Dockerfile)
STORAGE_CLAIM = "moe-storage"
#: The S3 variant: the Secret with the object store's keys (data keys = the AWS variable names), optional
#: so that an IAM role on the ServiceAccount (IRSA, EKS Pod Identity, GKE Workload Identity) can replace it.
S3_SECRET = "moe-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: The ServiceAccount of the S3 variant's pods; its role annotation is a placeholder to fill in.
SERVICE_ACCOUNT = NAME
IAM_ROLE_ANNOTATION = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/moe-storage"}
#: The node's directory holding the node cache (create it owned by uid 1000 on every GPU node).
NODE_CACHE_HOST_PATH = "/var/lib/moe-node-cache"
HF_SECRET = "hf-token"
#: The Secret holding the API keys (one per line under the data key named by api.key_file's file name).
API_KEY_SECRET = "moe-api-keys"
#: Its data key for api.key_env.
API_KEY_ENV_KEY = "key"
H100_LABEL = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# An fp32 merge of the 8B model holds ~33 GB of weights in host memory while loading: its worker gets
# 96 GiB, like a serving worker.
MERGE_WORKER_MEMORY = "96Gi"
#: Ray's metrics export port on every pod (KubeRay's default, set explicitly): the PodMonitor scrapes it.
METRICS_PORT = 8080
POD_LABELS = {"app.kubernetes.io/name": NAME}
#: Local scratch disk per pod (logs, /tmp, Ray's session dir): bounded, so a runaway writer is evicted.
EPHEMERAL_STORAGE = "20Gi"
#: The Ray image's user (uid 1000, "ray"); nothing runs as root.
RAY_UID = 1000
#: Ray's token authentication, with the token in a Secret KubeRay generates and hands to its own calls
#: (serveConfigV2 deploys, job submission) and to every Ray pod: the dashboard and job API answer nobody else.
AUTH_OPTIONS = {"mode": "token"}
#: Pods allowed to reach the Ray ports of the cluster besides its own: the KubeRay operator (deploys,
#: health) and Prometheus (metrics); everything else reaches only Serve's HTTP port.
OPERATOR_PODS = {"app.kubernetes.io/name": "kuberay-operator"}
PROMETHEUS_PODS = {"app.kubernetes.io/name": "prometheus"}
SERVE_PORT = 8000
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365

Resources = dict[str, dict[str, str]]


def _quantity(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _resources(cpu: float, memory: str, gpu: int = 0, scratch: str = EPHEMERAL_STORAGE) -> Resources:
    """Requests equal to limits (Guaranteed QoS), local scratch disk bounded too (model files live on the
    shared volume, so a pod writing past ``scratch`` is evicted instead of filling the node)."""
    amounts = {"cpu": _quantity(cpu), "memory": memory, "ephemeral-storage": scratch}
    if gpu:
        amounts["nvidia.com/gpu"] = str(gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _shared_volume(cfg: DeploymentConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The shared ReadWriteMany volume (k8s/storage.yaml): pod volumes and container mounts."""
    mount = cfg.storage.url if cfg.storage.url.startswith("/") else "/mnt/moe-storage"
    volumes = [{"name": "storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}}]
    mounts = [{"name": "storage", "mountPath": mount}]
    return volumes, mounts


def _node_cache(cfg: DeploymentConfig, gpu_node: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Object storage: no shared volume. On a GPU node, the node cache: a directory on the node shared by
    its pods (a version on the node is downloaded once; hostPath is outside the pods' bounded scratch
    disk), which exists on the GPU nodes only (type Directory: a pod elsewhere would not start). The head
    and CPU workers, placed anywhere, get an emptyDir at the same path (HF_HOME, a fetch they make)."""
    if gpu_node:
        source: dict[str, Any] = {"hostPath": {"path": NODE_CACHE_HOST_PATH, "type": "Directory"}}
    else:
        source = {"emptyDir": {}}
    volumes = [{"name": "node-cache", **source}]
    mounts = [{"name": "node-cache", "mountPath": cfg.storage.cache_dir}]
    return volumes, mounts


def _storage(cfg: DeploymentConfig, *, gpu_node: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and container mounts of the config's storage variant (``gpu_node``: the pod is
    placed on a GPU node by its node selector)."""
    return _node_cache(cfg, gpu_node) if cfg.storage.is_s3 else _shared_volume(cfg)


def _hf_home(cfg: DeploymentConfig) -> str:
    """Where Hugging Face downloads the base model: the shared volume, or the node cache on S3."""
    return f"{cfg.storage.cache_dir}/hf" if cfg.storage.is_s3 else "/mnt/moe-storage/hf-cache"


def _s3_env(cfg: DeploymentConfig) -> list[dict[str, Any]]:
    """The object store's keys from the Secret (optional: an IAM role may stand in for it)."""
    if not cfg.storage.is_s3:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key, "optional": True}}}
        for key in S3_SECRET_KEYS
    ]


Volumes = tuple[list[dict[str, Any]], list[dict[str, Any]]]


def _api_keys(cfg: DeploymentConfig) -> Volumes:
    """The API-key Secret as a read-only folder at api.key_file's parent (no subPath: updates reach it)."""
    if cfg.api.key_file is None:
        return [], []
    folder = str(PurePath(cfg.api.key_file).parent)
    volume = {"name": "api-keys", "secret": {"secretName": API_KEY_SECRET, "optional": False}}
    return [volume], [{"name": "api-keys", "mountPath": folder, "readOnly": True}]


def _api_key_env(cfg: DeploymentConfig) -> list[dict[str, Any]]:
    """api.key_env from the Secret (required: a pod without its key does not start)."""
    if cfg.api.key_env is None:
        return []
    ref = {"name": API_KEY_SECRET, "key": API_KEY_ENV_KEY, "optional": False}
    return [{"name": cfg.api.key_env, "valueFrom": {"secretKeyRef": ref}}]


def _env(cfg: DeploymentConfig, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "token", "optional": True}},
        },
        {"name": "HF_HOME", "value": _hf_home(cfg)},
        *_s3_env(cfg),
        *extra,
    ]


def _pod(
    cfg: DeploymentConfig, container: dict[str, Any], volumes: list[dict[str, Any]], *, gpu: bool = False
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RAY_UID,
            "runAsGroup": RAY_UID,
            "fsGroup": RAY_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,  # Ray pods never call the Kubernetes API
    }
    if cfg.storage.is_s3:  # its IAM role annotation (if used) reaches the object store, not the API server
        spec["serviceAccountName"] = SERVICE_ACCOUNT
    if gpu:
        spec["nodeSelector"] = dict(H100_LABEL)
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    spec["containers"] = [container]
    spec["volumes"] = volumes
    return {"metadata": {"labels": dict(POD_LABELS)}, "spec": spec}


def _container(
    name: str,
    resources: Resources,
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": IMAGE, "resources": resources}
    c["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    c["ports"] = [*(ports or []), {"containerPort": METRICS_PORT, "name": "metrics"}]
    c["env"] = env
    c["volumeMounts"] = mounts
    return c


def _head_group(
    cfg: DeploymentConfig,
    resources: Resources,
    env: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    extra: Volumes = ([], []),
) -> dict[str, Any]:
    """The head runs no replicas or tasks (num-cpus 0): only the GCS, dashboard and job server."""
    volumes, mounts = _storage(cfg, gpu_node=False)
    volumes, mounts = volumes + extra[0], mounts + extra[1]
    return {
        "rayStartParams": {
            "num-cpus": "0",
            "dashboard-host": "0.0.0.0",
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": _pod(cfg, _container("ray-head", resources, env, mounts, ports), volumes),
    }


def _worker_group(
    cfg: DeploymentConfig,
    *,
    cpu: float,
    memory: str,
    gpu: int,
    env: list[dict[str, Any]],
    replicas: int,
    min_replicas: int,
    max_replicas: int,
    shm: str | None = None,
    extra: Volumes = ([], []),
) -> dict[str, Any]:
    """One worker group; with GPUs its pods go to the H100 nodes (node selector, taint toleration)."""
    volumes, mounts = _storage(cfg, gpu_node=bool(gpu))
    volumes, mounts = volumes + extra[0], mounts + extra[1]
    if shm:
        volumes = [*volumes, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
        mounts = [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]
    container = _container("ray-worker", _resources(cpu, memory, gpu), env, mounts)
    return {
        "groupName": "h100" if gpu else "cpu",
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": {"num-gpus": str(gpu), "metrics-export-port": str(METRICS_PORT)},
        "template": _pod(cfg, container, volumes, gpu=bool(gpu)),
    }


def max_gpu_replicas(cfg: DeploymentConfig) -> int:
    merged = sum(a.max_replicas for a in cfg.merged_enabled if a.gpu > 0)
    dynamic = cfg.dynamic.max_replicas if cfg.dynamic.enabled and cfg.dynamic.gpu > 0 else 0
    return max(1, merged + dynamic)


def min_gpu_replicas(cfg: DeploymentConfig) -> int:
    merged = sum(a.min_replicas for a in cfg.merged_enabled if a.gpu > 0)
    dynamic = cfg.dynamic.min_replicas if cfg.dynamic.enabled and cfg.dynamic.gpu > 0 else 0
    return merged + dynamic


def rayservice(cfg: DeploymentConfig, name: str = NAME) -> dict[str, Any]:
    """The serving cluster; the gateway may run on any of its pods, so each gets the API keys."""
    env = _env(cfg, {"name": "RAY_SERVE_ENABLE_TASK_EVENTS", "value": "0"}, *_api_key_env(cfg))
    keys = _api_keys(cfg)
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8000, "name": "serve"},
    ]
    gpu_worker = _worker_group(
        cfg,
        cpu=12,
        memory="96Gi",
        gpu=1,
        env=env,
        replicas=max(1, min_gpu_replicas(cfg)),
        min_replicas=min_gpu_replicas(cfg),
        max_replicas=max_gpu_replicas(cfg),
        shm="16Gi",
        extra=keys,
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 900,
            "serveConfigV2": yaml.safe_dump(serve_config(cfg), sort_keys=False, width=120),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "authOptions": dict(AUTH_OPTIONS),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
                "headGroupSpec": _head_group(cfg, _resources(4, "16Gi"), env, ports, keys),
                "workerGroupSpecs": [gpu_worker],
            },
        },
    }


def rayjob(
    cfg: DeploymentConfig, source: str = "config/deployment.k8s.yaml", name: str = NAME
) -> dict[str, Any]:
    """`python -m merge_jobs --all-merged` on a one-worker cluster sized by the config's merge section.

    The job reads the copy of ``source`` baked into the image (config/ under APP_DIR). Each merge is a Ray
    task asking for merge.gpu/merge.cpu, so the worker pod gets exactly that (GPUs rounded up to whole
    devices). shutdownAfterJobFinishes deletes the cluster once ttlSecondsAfterFinished has passed.
    """
    config_in_image = f"{APP_DIR}/config/{PurePath(source).name}"
    worker = _worker_group(
        cfg,
        cpu=cfg.merge.cpu,
        memory=MERGE_WORKER_MEMORY,
        gpu=math.ceil(cfg.merge.gpu),
        env=_env(cfg),
        replicas=1,
        min_replicas=1,
        max_replicas=1,
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "generateName": "moe-merge-",
            "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "merge"},
        },
        "spec": {
            "entrypoint": f"python -m merge_jobs --config {config_in_image} --all-merged",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": 7200,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": {
                "rayVersion": ray.__version__,
                "authOptions": dict(AUTH_OPTIONS),
                "headGroupSpec": _head_group(cfg, _resources(2, "8Gi"), _env(cfg)),
                "workerGroupSpecs": [worker],
            },
        },
    }


GENERATED = "# Generated from {source} by `python -m deployments.kube`; do not edit by hand.\n"
RAYSERVICE_HEADER = "# serveConfigV2 is the Serve config of that file: editing its live fields and re-applying updates in place.\n"
RAYJOB_HEADER = (
    "# Merge the adapters the config marks merged into the base weights as a RayJob on a GPU node; each merged\n"
    "# model is verified and published atomically to {where}, where the RayService picks it up.\n"
    "#   kubectl create -f k8s/{folder}rayjob-merge.yaml        (generateName: one job per create)\n"
)


class _NoAliasDumper(yaml.SafeDumper):
    """Spell shared pieces out in full in each place (no &anchors/*aliases): manifests are read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def render_rayservice(cfg: DeploymentConfig, source: str) -> str:
    return GENERATED.format(source=source) + RAYSERVICE_HEADER + _dump(rayservice(cfg))


def render_rayjob(cfg: DeploymentConfig, source: str) -> str:
    where, folder = ("the bucket", "s3/") if cfg.storage.is_s3 else ("the shared volume", "")
    header = RAYJOB_HEADER.format(where=where, folder=folder)
    return GENERATED.format(source=source) + header + _dump(rayjob(cfg, source))


def podmonitor(name: str = NAME) -> dict[str, Any]:
    """Prometheus Operator's PodMonitor for the Ray pods' metrics port (ray_serve_* and ray_moe_*)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "selector": {"matchLabels": dict(POD_LABELS)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def networkpolicy(name: str = NAME) -> dict[str, Any]:
    """Ingress to the Ray pods: from each other (GCS, object transfer, replicas), Serve's HTTP port from
    anywhere, the dashboard (and its agent) from the KubeRay operator, the metrics port from Prometheus.
    The dashboard's job API (code execution) is reachable from nothing else, and needs Ray's token too."""
    own = {"podSelector": {"matchLabels": dict(POD_LABELS)}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_PODS)}}
    prometheus = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(PROMETHEUS_PODS)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "podSelector": {"matchLabels": dict(POD_LABELS)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own]},
                {"ports": [{"port": SERVE_PORT, "protocol": "TCP"}]},
                {
                    "from": [operator],
                    "ports": [
                        {"port": DASHBOARD_PORT, "protocol": "TCP"},
                        {"port": DASHBOARD_AGENT_PORT, "protocol": "TCP"},
                    ],
                },
                {"from": [prometheus], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]},
            ],
        },
    }


NETWORKPOLICY_HEADER = (
    "# Only Serve's port (8000) is open beyond the Ray pods; the dashboard and job API (8265) only to the\n"
    "# KubeRay operator, metrics (8080) only to Prometheus. Applied by `kubectl apply -k k8s/{folder}`.\n"
)


def render_networkpolicy(cfg: DeploymentConfig, source: str) -> str:
    header = NETWORKPOLICY_HEADER.format(folder="s3/" if cfg.storage.is_s3 else "")
    return GENERATED.format(source=source) + header + _dump(networkpolicy())


PODMONITOR_HEADER = (
    "# Scrapes Ray's metrics port on the RayService and RayJob pods (Prometheus Operator). Optional:\n"
    "#   kubectl apply -f k8s/podmonitor.yaml     (needs the monitoring.coreos.com CRDs); dashboard:\n"
    "#   k8s/grafana-dashboard.json\n"
)


def render_podmonitor(cfg: DeploymentConfig, source: str) -> str:
    return GENERATED.format(source=source) + PODMONITOR_HEADER + _dump(podmonitor())


def serviceaccount(name: str = NAME) -> dict[str, Any]:
    """The S3 variant's ServiceAccount: annotate it with an IAM role (IRSA here; GKE Workload Identity:
    iam.gke.io/gcp-service-account) instead of creating the Secret moe-s3-credentials."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": SERVICE_ACCOUNT,
            "labels": {"app.kubernetes.io/name": name},
            "annotations": dict(IAM_ROLE_ANNOTATION),
        },
        "automountServiceAccountToken": False,
    }


SERVICEACCOUNT_HEADER = (
    "# The pods' identity on S3 storage: either set the IAM role below (and create no Secret), or remove the\n"
    "# annotation and create the Secret with the object store's keys:\n"
    f"#   kubectl create secret generic {S3_SECRET} --from-literal=AWS_ACCESS_KEY_ID=... \\\n"
    "#       --from-literal=AWS_SECRET_ACCESS_KEY=...\n"
)


def render_serviceaccount(cfg: DeploymentConfig, source: str) -> str:
    return GENERATED.format(source=source) + SERVICEACCOUNT_HEADER + _dump(serviceaccount())


FILES: dict[str, Callable[[DeploymentConfig, str], str]] = {
    "rayservice.yaml": render_rayservice,
    "rayjob-merge.yaml": render_rayjob,
    "podmonitor.yaml": render_podmonitor,
    "networkpolicy.yaml": render_networkpolicy,
}
#: What the S3 variant adds.
S3_FILES: dict[str, Callable[[DeploymentConfig, str], str]] = {"serviceaccount.yaml": render_serviceaccount}


def files_for(cfg: DeploymentConfig) -> dict[str, Callable[[DeploymentConfig, str], str]]:
    """The manifests of the config's storage variant."""
    return FILES | S3_FILES if cfg.storage.is_s3 else dict(FILES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.kube", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/deployment.k8s.yaml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, metavar="DIR", help="write the manifests into this directory")
    g.add_argument("--check", type=Path, metavar="DIR", help="fail when a manifest there is out of date")
    args = p.parse_args(argv)
    directory: Path = args.out or args.check
    if directory.is_file() or directory.suffix in {".yaml", ".yml"}:
        p.error(f"--out/--check take the directory holding {' and '.join(FILES)}, not a file")
    if args.out:
        directory.mkdir(parents=True, exist_ok=True)
    cfg = DeploymentConfig.from_file(args.config)
    rc = 0
    for filename, render in files_for(cfg).items():
        path = directory / filename
        one = argparse.Namespace(
            config=args.config, out=path if args.out else None, check=path if args.check else None
        )
        rc = max(rc, write_or_check(render(cfg, args.config), one))
    return rc


if __name__ == "__main__":
    sys.exit(main())
