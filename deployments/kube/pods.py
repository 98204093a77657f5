"""The pieces both clusters are built from: resources, the storage variant's volumes, the environment
(Hugging Face token, object-store keys, API keys), pods and containers, and the head and worker groups."""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from deployments.kube.constants import (
    API_KEY_ENV_KEY,
    API_KEY_SECRET,
    EPHEMERAL_STORAGE,
    GPU_TOLERATION,
    H100_LABEL,
    HF_SECRET,
    IMAGE,
    METRICS_PORT,
    NODE_CACHE_HOST_PATH,
    POD_LABELS,
    RAY_UID,
    S3_SECRET,
    S3_SECRET_KEYS,
    SERVICE_ACCOUNT,
    STORAGE_CLAIM,
)
from moe_core.config import DeploymentConfig

__all__ = [
    "Resources",
    "Volumes",
    "api_key_env",
    "api_key_volumes",
    "head_group",
    "pod_env",
    "pod_resources",
    "worker_group",
]

Resources = dict[str, dict[str, str]]


def _quantity(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def pod_resources(cpu: float, memory: str, gpu: int = 0, scratch: str = EPHEMERAL_STORAGE) -> Resources:
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


def api_key_volumes(cfg: DeploymentConfig) -> Volumes:
    """The API-key Secret as a read-only folder at api.key_file's parent (no subPath: updates reach it)."""
    if cfg.api.key_file is None:
        return [], []
    folder = str(PurePath(cfg.api.key_file).parent)
    volume = {"name": "api-keys", "secret": {"secretName": API_KEY_SECRET, "optional": False}}
    return [volume], [{"name": "api-keys", "mountPath": folder, "readOnly": True}]


def api_key_env(cfg: DeploymentConfig) -> list[dict[str, Any]]:
    """api.key_env from the Secret (required: a pod without its key does not start)."""
    if cfg.api.key_env is None:
        return []
    ref = {"name": API_KEY_SECRET, "key": API_KEY_ENV_KEY, "optional": False}
    return [{"name": cfg.api.key_env, "valueFrom": {"secretKeyRef": ref}}]


def pod_env(cfg: DeploymentConfig, *extra: dict[str, Any]) -> list[dict[str, Any]]:
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


def head_group(
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


def worker_group(
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
    group: str | None = None,
    resources: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One worker group; with GPUs its pods go to the H100 nodes (node selector, taint toleration).
    ``group`` names it (default ``h100`` or ``cpu``); ``resources`` are the Ray custom resources its pods
    offer (a further model's group: only that model's replicas ask for them)."""
    volumes, mounts = _storage(cfg, gpu_node=bool(gpu))
    volumes, mounts = volumes + extra[0], mounts + extra[1]
    if shm:
        volumes = [*volumes, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
        mounts = [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]
    container = _container("ray-worker", pod_resources(cpu, memory, gpu), env, mounts)
    params = {"num-gpus": str(gpu), "metrics-export-port": str(METRICS_PORT)}
    if resources:
        params["resources"] = json.dumps(resources, separators=(",", ":"))
    return {
        "groupName": group or ("h100" if gpu else "cpu"),
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": params,
        "template": _pod(cfg, container, volumes, gpu=bool(gpu)),
    }
