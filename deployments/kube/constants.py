"""What the generated manifests share: names, the image, Secrets, labels, node placement, ports and sizes."""

from __future__ import annotations

__all__ = [
    "API_KEY_SECRET",
    "H100_LABEL",
    "IMAGE",
    "MERGE_WORKER_MEMORY",
    "METRICS_PORT",
    "NAME",
    "NODE_CACHE_HOST_PATH",
    "S3_SECRET",
    "S3_SECRET_KEYS",
    "SERVICE_ACCOUNT",
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
