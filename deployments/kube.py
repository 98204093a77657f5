"""Generate k8s/rayservice.yaml: the KubeRay RayService whose serveConfigV2 is our Serve config.

    python -m deployments.kube --config config/deployment.k8s.yaml --out k8s/rayservice.yaml
    python -m deployments.kube --config config/deployment.k8s.yaml --check k8s/rayservice.yaml

Sizing assumptions (Qwen3-VL-8B-Instruct in bf16 on H100 80 GB): ~17 GB of weights per replica, one
replica per GPU; worker pods of 1 GPU, 12 CPUs and 96 GiB of memory (model load, image decoding,
safetensors page cache); the head runs no replicas (num-cpus 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import ray
import yaml

from deployments.serve_config import serve_config, write_or_check
from moe_core.config import DeploymentConfig

__all__ = ["IMAGE", "rayservice"]

IMAGE = "ghcr.io/moe-inference-server/moe-inference-server:0.1.0"
STORAGE_CLAIM = "moe-storage"
HF_SECRET = "hf-token"
H100_LABEL = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def _volumes(mount: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [{"name": "storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}}]
    mounts = [{"name": "storage", "mountPath": mount}]
    return volumes, mounts


def _env() -> list[dict[str, Any]]:
    return [
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "token", "optional": True}},
        },
        {"name": "HF_HOME", "value": "/mnt/moe-storage/hf-cache"},
        {"name": "RAY_SERVE_ENABLE_TASK_EVENTS", "value": "0"},
    ]


def max_gpu_replicas(cfg: DeploymentConfig) -> int:
    merged = sum(a.max_replicas for a in cfg.merged_enabled if a.gpu > 0)
    dynamic = cfg.dynamic.max_replicas if cfg.dynamic.enabled and cfg.dynamic.gpu > 0 else 0
    return max(1, merged + dynamic)


def min_gpu_replicas(cfg: DeploymentConfig) -> int:
    merged = sum(a.min_replicas for a in cfg.merged_enabled if a.gpu > 0)
    dynamic = cfg.dynamic.min_replicas if cfg.dynamic.enabled and cfg.dynamic.gpu > 0 else 0
    return merged + dynamic


def rayservice(cfg: DeploymentConfig, name: str = "moe-inference-server") -> dict[str, Any]:
    mount = cfg.storage.url if cfg.storage.url.startswith("/") else "/mnt/moe-storage"
    volumes, mounts = _volumes(mount)
    serve_v2 = yaml.safe_dump(serve_config(cfg), sort_keys=False, width=120)
    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": IMAGE,
                        "resources": {
                            "requests": {"cpu": "4", "memory": "16Gi"},
                            "limits": {"cpu": "4", "memory": "16Gi"},
                        },
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                            {"containerPort": 8000, "name": "serve"},
                        ],
                        "env": _env(),
                        "volumeMounts": mounts,
                    }
                ],
                "volumes": volumes,
            }
        },
    }
    gpu_worker = {
        "groupName": "h100",
        "replicas": max(1, min_gpu_replicas(cfg)),
        "minReplicas": min_gpu_replicas(cfg),
        "maxReplicas": max_gpu_replicas(cfg),
        "rayStartParams": {"num-gpus": "1"},
        "template": {
            "spec": {
                "nodeSelector": dict(H100_LABEL),
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": IMAGE,
                        "resources": {
                            "requests": {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "1"},
                            "limits": {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "1"},
                        },
                        "env": _env(),
                        "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
                    }
                ],
                "volumes": [
                    *volumes,
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                ],
            }
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 900,
            "serveConfigV2": serve_v2,
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
                "headGroupSpec": head,
                "workerGroupSpecs": [gpu_worker],
            },
        },
    }


HEADER = (
    "# Generated from {source} by `python -m deployments.kube`; do not edit by hand.\n"
    "# serveConfigV2 is the Serve config of that file: editing its live fields and re-applying updates in place.\n"
)


def render(cfg: DeploymentConfig, source: str) -> str:
    return HEADER.format(source=source) + yaml.safe_dump(rayservice(cfg), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.kube", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/deployment.k8s.yaml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path)
    g.add_argument("--check", type=Path)
    args = p.parse_args(argv)
    return write_or_check(render(DeploymentConfig.from_file(args.config), args.config), args)


if __name__ == "__main__":
    sys.exit(main())
