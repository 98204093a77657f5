"""deployments: the Ray Serve graph (gateway ingress, merged deployments, dynamic-LoRA deployment)."""

from deployments.app import AppArgs, build_app

__all__ = ["AppArgs", "build_app"]
