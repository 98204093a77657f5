"""The gateway, the HTTP ingress: validates input, routes, and translates every failure to an HTTP status,
here only.

No model, no GPU and no torch. An image is checked from its header only and forwarded as bytes, crossing
each hop once (a model replica decodes it, once); a request is generated exactly once (merged, or dynamic, or dynamic after a merged failure).
Two APIs over the same deployments: ``POST /infer`` (one screenshot, one instruction) and the
OpenAI-compatible ``/v1`` (:mod:`deployments.openai_api`: chat completions, streamed or not, and the
model list), each with its own error shape.

- :mod:`deployments.gateway.api`: the FastAPI app, its middlewares and request-validation errors.
- :mod:`deployments.gateway.middleware`: API keys and the request-body bound, as ASGI middlewares.
- :mod:`deployments.gateway.errors`: a deployment call's failure as the client sees it.
- :mod:`deployments.gateway.core`: :class:`~deployments.gateway.core.GatewayCore`, live settings,
  promotion, and a deployment call with its timeout.
- :mod:`deployments.gateway.pipeline`: either API's request, read, as the query: images checked and
  planned, the gateway's limits checked, once for both APIs.
- :mod:`deployments.gateway.dispatch`: who answers (named, base or routed) and the one call that answers,
  whole or streamed, with the fallback from merged to dynamic.
- :mod:`deployments.gateway.infer`: ``POST /infer``: its request read, its response shaped.
- :mod:`deployments.gateway.openai_routes`: the ``/v1`` routes: the chat request read, OpenAI's answer or
  its Server-Sent Events.
- :mod:`deployments.gateway.service`: :class:`~deployments.gateway.service.Gateway`, the operational
  routes, and :data:`~deployments.gateway.service.GatewayIngress` for Serve.
"""
