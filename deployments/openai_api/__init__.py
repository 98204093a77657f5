"""The OpenAI-compatible API's side of the gateway: request and response models, model names, the
reading of chat messages, OpenAI's error shape and Server-Sent Events.

No Ray and no model here: the gateway (:mod:`deployments.gateway`) serves the routes and carries out the
calls; everything it needs to speak OpenAI is a value or a pure function of this package, unit-tested on
its own. The API keys and the body limit that guard every route are the gateway's middlewares
(:mod:`deployments.gateway.middleware`).

- :mod:`deployments.openai_api.errors`: OpenAI's error shape, and FastAPI's validation errors in it.
- :mod:`deployments.openai_api.request`: the chat completion request, its checks and its sampling.
- :mod:`deployments.openai_api.models`: ``/v1/models`` and what a request's ``model`` names.
- :mod:`deployments.openai_api.conversation`: the messages read (turns, image sources; image URLs fetched);
  the gateway's pipeline checks the images and makes the query (:mod:`deployments.gateway.pipeline`).
- :mod:`deployments.openai_api.responses`: ``chat.completion`` and the ``X-Moe-*`` headers.
- :mod:`deployments.openai_api.stream`: ``chat.completion.chunk`` events (Server-Sent Events).
- :mod:`deployments.openai_api.outputs`: structured outputs as clients ask for them (``response_format``,
  vLLM's ``structured_outputs``), read into one constraint (``/infer``'s ``response_format`` too).
- :mod:`deployments.openai_api.tool_calls`: tools rendered by the model's template, its ``<tool_call>``
  blocks read back as OpenAI's ``tool_calls``.

What a client sees beyond OpenAI's schema (a plain OpenAI client ignores it):

- ``moe`` in each ``chat.completion`` and in the first ``chat.completion.chunk``: :class:`MoeInfo`
  (request id, adapter, mode, routed_via, confidence, fallback, merged_version, and the size the model saw
  each image at, to map an action's coordinates back to the screenshot).
- Response headers: ``X-Moe-Adapter`` (absent when the base model answered), ``X-Moe-Mode``,
  ``X-Moe-Routed-Via``, ``X-Moe-Fallback``, ``X-Moe-Confidence`` (routed requests) and
  ``X-Moe-Merged-Version`` (merged answers), beside Serve's ``X-Request-Id``.
- Extension fields of a chat request, as ``/infer`` has them: ``prefer_merged``, ``min_pixels``,
  ``max_pixels``; and vLLM's: ``structured_outputs`` (and ``guided_*``), ``top_k``, ``min_tokens``,
  ``ignore_eos``, ``repetition_penalty``. vLLM's other sampling extras are refused with a 400 naming
  them, never ignored.
- ``usage.prompt_tokens_details``: ``cached_tokens`` (prompt tokens served from the prefix cache) and
  ``image_tokens``.

Structured outputs (:mod:`deployments.openai_api.outputs`) and tool calls (:mod:`deployments.openai_api.tool_calls`) are read
here into the query's constraint; a tool call the model writes is parsed back by the gateway.
"""
