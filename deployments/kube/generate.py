"""Generate k8s/: the KubeRay RayService (whose serveConfigV2 is our Serve config) and the merge RayJob.

    python -m deployments.kube --config config/deployment.k8s.yaml --out k8s/
    python -m deployments.kube --config config/deployment.k8s.yaml --check k8s/
    python -m deployments.kube --config config/deployment.k8s-s3.yaml --out k8s/s3/    # storage on S3

Each file is its manifest as YAML under a header saying where it comes from and how to apply it
(:mod:`deployments.kube` tells what the manifests hold).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from deployments.kube.constants import S3_SECRET
from deployments.kube.manifests import networkpolicy, podmonitor, rayjob, rayservice, serviceaccount
from deployments.serve_config import write_or_check
from moe_core.config import DeploymentConfig

__all__ = [
    "FILES",
    "S3_FILES",
    "files_for",
    "main",
    "render_networkpolicy",
    "render_podmonitor",
    "render_rayjob",
    "render_rayservice",
    "render_serviceaccount",
]

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
