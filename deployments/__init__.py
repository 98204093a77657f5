"""deployments: the Ray Serve graph (gateway ingress, merged deployments, dynamic-LoRA deployment).

The app is built by :func:`deployments.app.build_app` (Serve's ``import_path: deployments.app:build_app``).
By role:

- :mod:`deployments.gateway` (and :mod:`deployments.openai_api`, the OpenAI wire format): the HTTP edge.
- :mod:`deployments.models`: the model deployments, dynamic and merged.
- :mod:`deployments.promotion`: the controller that promotes hot adapters into promotion slots.
- :mod:`deployments.app`, :mod:`deployments.settings`, :mod:`deployments.serve_config`,
  :mod:`deployments.kube`: building the graph and its Serve and KubeRay configs.
- Shared by the edge and the models, free of Ray: :mod:`deployments.messages` (what crosses a handle),
  :mod:`deployments.routing` (the routing rules), :mod:`deployments.errors` (the client's error),
  :mod:`deployments.images` (an image checked from its header at the edge, decoded once in a replica),
  :mod:`deployments.observability` (metrics, request ids, logs). :mod:`deployments.schemas` holds
  ``/infer``'s HTTP models: the edge's; the models import nothing of the edge.

This package imports nothing itself, so a replica loads only its own deployment's modules: the gateway's
process never imports the engine or torch.
"""
