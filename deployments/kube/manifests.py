"""The manifests as documents: the serving RayService, the merge RayJob, the PodMonitor, the
NetworkPolicy and (storage on S3) the ServiceAccount."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import ray
import yaml

from deployments.app import model_resource
from deployments.kube.constants import (
    APP_DIR,
    AUTH_OPTIONS,
    DASHBOARD_AGENT_PORT,
    DASHBOARD_PORT,
    IAM_ROLE_ANNOTATION,
    MERGE_WORKER_MEMORY,
    METRICS_PORT,
    NAME,
    OPERATOR_PODS,
    POD_LABELS,
    PROMETHEUS_PODS,
    SERVE_PORT,
    SERVICE_ACCOUNT,
)
from deployments.kube.pods import (
    Volumes,
    api_key_env,
    api_key_volumes,
    head_group,
    pod_env,
    pod_resources,
    worker_group,
)
from deployments.serve_config import serve_config
from moe_core.config import DeploymentConfig

__all__ = [
    "max_gpu_replicas",
    "min_gpu_replicas",
    "networkpolicy",
    "podmonitor",
    "rayjob",
    "rayservice",
    "serviceaccount",
]


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
    env = pod_env(cfg, {"name": "RAY_SERVE_ENABLE_TASK_EVENTS", "value": "0"}, *api_key_env(cfg))
    keys = api_key_volumes(cfg)
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8000, "name": "serve"},
    ]
    gpu_worker = worker_group(
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
                "headGroupSpec": head_group(cfg, pod_resources(4, "16Gi"), env, ports, keys),
                "workerGroupSpecs": [gpu_worker, *_model_groups(cfg, env, keys)],
            },
        },
    }


def _model_groups(cfg: DeploymentConfig, env: list[dict[str, Any]], keys: Volumes) -> list[dict[str, Any]]:
    """One GPU worker group per further model on GPUs (config ``models``, e.g. chandra): a pod per replica,
    offering that model's custom resource, which only its replicas ask for (:func:`deployments.app.model_options`)."""
    return [
        worker_group(
            cfg,
            cpu=12,
            memory="96Gi",
            gpu=max(1, math.ceil(m.gpu)),
            env=env,
            replicas=max(1, m.min_replicas),
            min_replicas=m.min_replicas,
            max_replicas=m.max_replicas,
            shm="16Gi",
            extra=keys,
            group=model_resource(m.name),
            resources={model_resource(m.name): 1},
        )
        for m in cfg.models_enabled
        if m.gpu > 0
    ]


def rayjob(
    cfg: DeploymentConfig, source: str = "config/deployment.k8s.yaml", name: str = NAME
) -> dict[str, Any]:
    """`python -m merge_jobs --all-merged` on a one-worker cluster sized by the config's merge section.

    The job reads the copy of ``source`` baked into the image (config/ under APP_DIR). Each merge is a Ray
    task asking for merge.gpu/merge.cpu, so the worker pod gets exactly that (GPUs rounded up to whole
    devices). shutdownAfterJobFinishes deletes the cluster once ttlSecondsAfterFinished has passed.
    """
    config_in_image = f"{APP_DIR}/config/{PurePath(source).name}"
    worker = worker_group(
        cfg,
        cpu=cfg.merge.cpu,
        memory=MERGE_WORKER_MEMORY,
        gpu=math.ceil(cfg.merge.gpu),
        env=pod_env(cfg),
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
                "headGroupSpec": head_group(cfg, pod_resources(2, "8Gi"), pod_env(cfg)),
                "workerGroupSpecs": [worker],
            },
        },
    }


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


# Kubernetes objects share their apiVersion/kind/metadata/spec shape: not a repeated block.
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
