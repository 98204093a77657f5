"""deployments: the Ray Serve graph (gateway ingress, merged deployments, dynamic-LoRA deployment).

The app is built by :func:`deployments.app.build_app` (Serve's ``import_path: deployments.app:build_app``).
This package imports nothing itself, so a replica loads only its own deployment's modules: the gateway's
process never imports the engine or torch.
"""
