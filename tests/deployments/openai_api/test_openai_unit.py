"""The OpenAI-compatible API on fake deployment handles: the gateway's FastAPI app driven over HTTP (the
official ``openai`` SDK and raw requests), without Ray or a model (the end-to-end tests run the real ones)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import inspect
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from PIL import Image
from starlette.testclient import TestClient

from deployments.gateway.api import GUARDS, api
from deployments.gateway.middleware import ApiKeys
from deployments.gateway.openai_routes import chat_request
from deployments.gateway.pipeline import Intake, intake
from deployments.gateway.service import Gateway
from deployments.messages import Answer, Chunk, Query, RouteRequest, RouteResult, TokenLogprob, Turn
from deployments.openai_api.conversation import build_conversation, host_allowed
from deployments.openai_api.errors import ApiError, validation_error
from deployments.openai_api.models import model_list, public_storage_root
from deployments.openai_api.request import ChatCompletionRequest, sampling_of
from deployments.routing import Classification, RoutingPolicy, decide
from deployments.schemas import BadInput
from deployments.settings import GatewaySettings
from moe_core.answers import Timings
from moe_core.config import ConfigError, DeploymentConfig, LiveSettings

BASE = "builtin:tiny-qwen3-vl"


def _cfg(**sections: Any) -> DeploymentConfig:
    data: dict[str, Any] = {
        "router": {"adapter": "router", "labels": {0: "calendar", 1: "login-window"}},
        "merged": {"adapters": [{"name": "calendar"}]},
        "dynamic": {"adapters": ["login-window", "desktop"]},
        "limits": {"max_image_pixels": 4 * 1024 * 1024, "max_new_tokens": 16},
    }
    for key, value in sections.items():
        data[key] = data.get(key, {}) | value
    return DeploymentConfig.from_dict(data)


CFG = _cfg()


def _png(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(raw or _png()).decode()


def _user(text: str = "Click the day", image: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image or _data_url()}}]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


# ----------------------------------------------------------------------------- fake deployments
def _words(query: Query, adapter: str | None) -> list[str]:
    return f"{adapter or 'base'} says {query.prompt or '-'}".split(" ")


class FakeModel:
    """A merged or dynamic deployment: answers '<adapter> says <prompt>', streamed one word a chunk."""

    def __init__(self, mode: str, adapter: str | None = None) -> None:
        self.mode, self.adapter = mode, adapter
        self.fail: BaseException | None = None  # raised before anything is generated
        self.fail_after: int | None = None  # raise after this many chunks
        self.queries: list[tuple[Query, str | None]] = []
        self.verdict = Classification("calendar", 0.9, {"calendar": 0.9, "login-window": 0.1})
        self.routed: list[RouteRequest] = []

    def _answer(self, query: Query, adapter: str | None) -> Answer:
        words = _words(query, adapter)
        limit = query.sampling.max_tokens
        reason = "length" if limit is not None and limit < len(words) else "stop"
        words = words[:limit]
        version = "m1" if self.mode == "merged" else ("v1" if adapter else None)
        asked = query.sampling.logprobs
        logprobs = tuple(
            TokenLogprob(w, -0.5, (((w, -0.5), ("x", -2.0))[:asked] if asked else ()))
            for w in ([words[0]] + [" " + w for w in words[1:]] if asked is not None else [])
        )
        return Answer(
            text=" ".join(words),
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=10 + query.image_tokens,
            completion_tokens=len(words),
            batch_size=1,
            adapters_in_batch=1,
            timings=Timings(0.0, 0.0, 0.0, 0.0),
            cached_tokens=4,
            logprobs=logprobs,
            adapter=adapter,
            mode=self.mode,  # type: ignore[arg-type]
            version=version,
        )

    async def generate(self, query: Query, adapter: str | None = None) -> Answer:
        adapter = self.adapter or adapter
        self.queries.append((query, adapter))
        if self.fail is not None:
            raise self.fail
        return self._answer(query, adapter)

    async def stream(self, query: Query, adapter: str | None = None) -> AsyncIterator[Chunk]:
        adapter = self.adapter or adapter
        self.queries.append((query, adapter))
        if self.fail is not None:
            raise self.fail
        answer = self._answer(query, adapter)
        words = answer.text.split(" ")
        for i, word in enumerate(words):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("replica died mid-stream")
            last = i == len(words) - 1
            yield Chunk(
                text=word if i == 0 else " " + word,
                finish_reason=answer.finish_reason if last else None,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=i + 1,
                cached_tokens=answer.cached_tokens,
                logprobs=answer.logprobs[i : i + 1],
                adapter=adapter,
                mode=self.mode,  # type: ignore[arg-type]
                version=answer.version,
            )

    async def route(self, req: RouteRequest) -> RouteResult:
        self.routed.append(req)
        d = decide(self.verdict, req.policy, req.prefer_merged)
        answer = None
        if d.action == "answer" and d.target == "dynamic":
            answer = await self.generate(req.query, d.adapter)
        return RouteResult(d, answer)

    async def route_stream(self, req: RouteRequest) -> AsyncIterator[RouteResult | Chunk]:
        """The decision, then (when it is dynamic) the answer streamed from here."""
        self.routed.append(req)
        d = decide(self.verdict, req.policy, req.prefer_merged)
        yield RouteResult(d, None)
        if d.action == "answer" and d.target == "dynamic":
            async for chunk in self.stream(req.query, d.adapter):
                yield chunk


class FakeStream:
    """What ``handle.options(stream=True).method.remote(...)`` returns: async chunks, cancellable."""

    def __init__(self, gen: AsyncIterator[Chunk]) -> None:
        self.gen, self.cancelled = gen, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Chunk:
        return await self.gen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A deployment handle over a local object: ``handle.method.remote(...)`` and streaming calls."""

    def __init__(self, target: FakeModel) -> None:
        self.target = target
        self.streams: list[FakeStream] = []

    def options(self, stream: bool = False) -> FakeHandle:
        return self

    def __getattr__(self, method: str) -> Any:
        handle, fn = self, getattr(self.target, method)

        class _Method:
            def remote(self, *args: Any) -> Any:
                if inspect.isasyncgenfunction(fn):
                    handle.streams.append(FakeStream(fn(*args)))
                    return handle.streams[-1]
                return asyncio.ensure_future(fn(*args))

        return _Method()


class Service:
    """A gateway on fake deployments, its HTTP client, and an openai SDK client on it."""

    def __init__(self, cfg: DeploymentConfig = CFG, dynamic: bool = True, **live: Any) -> None:
        self.dynamic = FakeModel("dynamic")
        self.merged = FakeModel("merged", "calendar")
        self.handles = {"dynamic": FakeHandle(self.dynamic), "merged": FakeHandle(self.merged)}
        self.gateway = Gateway(
            GatewaySettings.of(cfg),
            self.handles["dynamic"] if dynamic else None,  # type: ignore[arg-type]
            {"calendar": self.handles["merged"]},  # type: ignore[dict-item]
        )
        self.gateway.reconfigure(LiveSettings.of(cfg).gateway.model_dump() | live)
        self.http = TestClient(api)
        self.sdk = openai.OpenAI(
            base_url="http://testserver/v1", api_key="sk-test", http_client=self.http, max_retries=0
        )

    def chat(self, **body: Any) -> Any:
        return self.http.post(
            "/v1/chat/completions", json={"model": "calendar", "messages": [_user()]} | body
        )


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """Serve's class-based view finds the gateway instance through the replica context: a fake one."""
    from ray import serve

    holder: dict[str, Service] = {}
    monkeypatch.setattr(
        serve, "get_replica_context", lambda: SimpleNamespace(servable_object=holder["s"].gateway)
    )

    def make(*args: Any, **kw: Any) -> Service:
        holder["s"] = Service(*args, **kw)
        return holder["s"]

    holder["s"] = Service()
    holder["s"].make = make  # type: ignore[attr-defined]
    yield holder["s"]
    GUARDS.keys = None


def _error(r: Any, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err: dict[str, Any] = body["error"]
    assert err["param"] == param and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- models
def test_models_list_never_shows_the_bucket() -> None:
    """On S3 the cards' root keeps its shape (where the adapter lives) but not the bucket or prefix."""
    cfg = _cfg(storage={"url": "s3://secret-bucket/tenant-a/prod"})
    settings = GatewaySettings.of(cfg)
    policy = RoutingPolicy(settings.labels, {"calendar"}, LiveSettings.of(cfg).gateway)
    cards = {c.id: c for c in model_list(policy, settings, True, 0).data}
    assert cards["calendar"].root == "s3://<storage>/experts/calendar"
    assert cards["auto"].root == "s3://<storage>/router/router"
    assert not any("secret-bucket" in str(c.root) or "tenant-a" in str(c.root) for c in cards.values())
    assert public_storage_root("storage/") == "storage" and public_storage_root("/mnt/x") == "/mnt/x"


def test_models_list_base_experts_and_auto(svc: Service) -> None:
    models = {m.id: m for m in svc.sdk.models.list()}
    assert set(models) == {BASE, "calendar", "login-window", "desktop", "auto"}
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models.values())
    raw = {m["id"]: m for m in svc.http.get("/v1/models").json()["data"]}
    assert raw["calendar"]["parent"] == BASE and raw["calendar"]["root"] == "storage/experts/calendar"
    assert raw[BASE]["parent"] is None and raw[BASE]["root"] == BASE
    assert raw["auto"]["root"] == "storage/router/router" and raw["auto"]["parent"] == BASE
    assert svc.sdk.models.retrieve("desktop").id == "desktop"
    assert svc.http.get(f"/v1/models/{BASE}").json()["id"] == BASE
    with pytest.raises(openai.NotFoundError):
        svc.sdk.models.retrieve("no-such")


def test_an_adapter_added_live_appears_without_restart(svc: Service) -> None:
    live = LiveSettings.of(CFG).gateway.model_dump()
    svc.gateway.reconfigure(live | {"dynamic_adapters": [*live["dynamic_adapters"], "chart-screen"]})
    assert "chart-screen" in {m.id for m in svc.sdk.models.list()}
    assert svc.chat(model="chart-screen").json()["moe"]["adapter"] == "chart-screen"


def test_no_routed_model_without_the_dynamic_deployment(svc: Service) -> None:
    s = svc.make(dynamic=False)  # type: ignore[attr-defined]
    assert "auto" not in {m.id for m in s.sdk.models.list()}
    _error(s.chat(model="auto"), 404, "model", "model_not_found")


def test_configured_model_names(svc: Service) -> None:
    s = svc.make(_cfg(api={"base_model_name": "qwen3-vl", "routed_model_name": "router-pick"}))  # type: ignore[attr-defined]
    ids = {m.id for m in s.sdk.models.list()}
    assert {"qwen3-vl", "router-pick"} <= ids and "auto" not in ids and BASE not in ids
    assert s.chat(model="router-pick").json()["moe"]["routed_via"] == "router"
    with pytest.raises(ConfigError, match=r"api\.routed_model_name 'calendar' is also an expert"):
        _cfg(api={"routed_model_name": "calendar"})
    live = LiveSettings.of(CFG).gateway.model_dump()
    with pytest.raises(ConfigError, match=r"dynamic_adapters: \['auto'\]"):
        svc.gateway.reconfigure(live | {"dynamic_adapters": ["login-window", "auto"]})


# ----------------------------------------------------------------------------- chat, not streamed
def test_chat_with_an_expert_through_the_sdk(svc: Service) -> None:
    out = svc.sdk.chat.completions.create(
        model="calendar",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url()}},
                    {"type": "text", "text": "Click the day"},
                ],
            }
        ],
    )
    assert out.object == "chat.completion" and out.model == "calendar" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "calendar says Click the day"
    assert out.choices[0].finish_reason == "stop"
    assert (
        out.usage is not None
        and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    )
    moe = out.model_extra["moe"]  # type: ignore[index]
    assert (moe["adapter"], moe["mode"], moe["routed_via"], moe["fallback"]) == (
        "calendar",
        "merged",
        "explicit",
        False,
    )
    assert moe["merged_version"] == "m1" and moe["confidence"] is None
    assert moe["images"] == [
        {"width": 64, "height": 48, "model_width": 320, "model_height": 224, "tokens": 70}
    ]
    assert out.usage.prompt_tokens == 10 + 70
    ((query, _),) = svc.merged.queries
    assert query.turns == () and query.images == () and query.prompt == "Click the day"  # as /infer sends it
    assert query.image == _png() and query.image_tokens == 70


def test_chat_headers_name_who_answered(svc: Service) -> None:
    r = svc.chat()
    assert r.status_code == 200
    h = r.headers
    assert (h["x-moe-adapter"], h["x-moe-mode"], h["x-moe-routed-via"], h["x-moe-fallback"]) == (
        "calendar",
        "merged",
        "explicit",
        "false",
    )
    assert h["x-moe-merged-version"] == "m1" and "x-moe-confidence" not in h
    r = svc.chat(model="login-window")
    assert r.headers["x-moe-mode"] == "dynamic" and "x-moe-merged-version" not in r.headers
    assert svc.chat(prefer_merged=False).json()["moe"]["mode"] == "dynamic"


def test_merged_failure_falls_back_once_or_is_a_503(svc: Service) -> None:
    svc.merged.fail = RuntimeError("replica died")
    r = svc.chat()
    assert r.json()["moe"]["fallback"] is True and r.json()["moe"]["mode"] == "dynamic"
    assert r.headers["x-moe-fallback"] == "true"
    assert len(svc.dynamic.queries) == 1
    s = svc.make(fallback_to_dynamic=False)  # type: ignore[attr-defined]
    s.merged.fail = RuntimeError("replica died")
    err = _error(s.chat(), 503, None, "unavailable")
    assert "replica died" in err["message"] and err["type"] == "server_error"


def test_base_model_answers_without_an_adapter(svc: Service) -> None:
    r = svc.chat(model=BASE)
    moe = r.json()["moe"]
    assert (moe["adapter"], moe["mode"]) == (None, "dynamic") and "x-moe-adapter" not in r.headers
    assert svc.dynamic.queries[-1][1] is None


def test_auto_routes_and_applies_the_threshold(svc: Service) -> None:
    r = svc.chat(model="auto")
    moe = r.json()["moe"]
    assert (moe["adapter"], moe["mode"], moe["routed_via"], moe["confidence"]) == (
        "calendar",
        "merged",
        "router",
        0.9,
    )
    assert r.headers["x-moe-confidence"] == "0.9000" and r.json()["model"] == "auto"
    svc.dynamic.verdict = Classification("login-window", 0.8, {"login-window": 0.8})
    r = svc.chat(model="auto")  # a dynamic decision: answered where it was routed
    assert r.json()["moe"]["adapter"] == "login-window" and r.json()["choices"][0]["message"]["content"]
    svc.dynamic.verdict = Classification("calendar", 0.3, {"calendar": 0.3, "login-window": 0.2})
    err = _error(svc.chat(model="auto"), 422, "model", "below_confidence_threshold")
    assert "candidates: calendar" in err["message"]
    s = svc.make(below_threshold="base")  # type: ignore[attr-defined]
    s.dynamic.verdict = svc.dynamic.verdict
    moe = s.chat(model="auto").json()["moe"]
    assert (moe["adapter"], moe["routed_via"]) == (None, "router-below-threshold")


def test_auto_needs_a_screenshot(svc: Service) -> None:
    r = svc.chat(model="auto", messages=[{"role": "user", "content": "hello"}])
    _error(r, 400, "messages", "image_required")


def test_unknown_model_is_a_404(svc: Service) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        svc.sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    _error(svc.chat(model="gpt-4o"), 404, "model", "model_not_found")


def test_n_other_than_one_is_a_400_naming_n(svc: Service) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        svc.sdk.chat.completions.create(model="calendar", messages=[_user()], n=2)  # type: ignore[list-item]
    assert e.value.param == "n"
    assert svc.chat(n=1).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({"temperature": 3}, 400, "temperature", "invalid_value"),
        ({"top_p": 0}, 400, "top_p", "invalid_value"),
        ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
        ({"max_tokens": 10**6}, 400, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": 10**6}, 400, "max_completion_tokens", "invalid_value"),
        ({"seed": 2**64}, 400, "seed", "invalid_value"),
        ({"stream": "yes"}, 400, "stream", "invalid_type"),
        ({"stop": 5}, 400, "stop", None),
        ({"stop": ["a", ""]}, 400, "stop", "invalid_value"),
        ({"model": 3}, 400, "model", "invalid_type"),
        ({"model": None}, 400, "model", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": "hi"}, 400, "messages", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", None),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            400,
            "messages.0.content.0",
            None,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            400,
            "messages.0.content.0.text",
            None,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
            400,
            "messages.0.content.0.image_url.url",
            None,
        ),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options", None),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
        ({"top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
        ({"tool_choice": "required"}, 400, "tool_choice", "invalid_value"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            400,
            "tool_choice",
            "invalid_value",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "has space"}}]},
            400,
            "tools.0.function.name",
            None,
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "response_format.json_schema.schema",
            None,
        ),
        ({"response_format": {"type": "xml"}}, 400, "response_format", None),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs", None),
        ({"structured_outputs": {"choice": []}}, 400, "structured_outputs.choice", None),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, 400, "guided_regex", None),
        ({"guided_json": "{not json"}, 400, "guided_json", None),
        ({"logit_bias": {"12": 5}}, 400, "logit_bias", "unsupported_value"),
        ({"min_p": 0.1}, 400, "min_p", "unsupported_value"),
        ({"use_beam_search": True}, 400, "use_beam_search", "unsupported_value"),
        ({"best_of": 2}, 400, "best_of", "unsupported_value"),
        ({"repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
        ({"min_tokens": 9, "max_tokens": 4}, 400, "min_tokens", "invalid_value"),
        ({"top_k": -2}, 400, "top_k", "invalid_value"),
        ({"max_pixels": 10**9}, 400, "max_pixels", None),
    ],
)
def test_wrong_types_and_values_name_the_field(
    svc: Service, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    _error(svc.chat(**body), status, param, code)


def test_unknown_fields_are_ignored_and_bad_json_is_a_400(svc: Service) -> None:
    r = svc.chat(user="someone", frequency_penalty=0, metadata={"a": "b"}, service_tier="auto", colour="red")
    assert r.status_code == 200
    r = svc.http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    _error(r, 400, None, "invalid_json")
    # /infer keeps its own error shape
    r = svc.http.post("/infer", json={"prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "image_b64"


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("https://example.com/screen.png", 400, "image_url_not_allowed"),
        ("http://169.254.169.254/latest/meta-data", 400, "image_url_not_allowed"),
        ("file:///etc/passwd", 400, "invalid_image_url"),
        ("data:text/plain;base64,aGk=", 400, "invalid_image_url"),
        ("data:image/png;base64,%%%", 400, "invalid_image"),
        (_data_url(b"GIF89a but not really"), 400, "invalid_image"),
        (_data_url(_png((2100, 2100))), 413, "too_large"),
    ],
)
def test_bad_and_remote_images_are_refused(svc: Service, url: str, status: int, code: str) -> None:
    err = _error(svc.chat(messages=[_user(image=url)]), status, "messages.0.content.0.image_url.url", code)
    if code == "image_url_not_allowed":
        assert "data URL" in err["message"]


def test_image_limits(svc: Service) -> None:
    many = [{"type": "image_url", "image_url": {"url": _data_url()}}] * (CFG.api.max_images + 1)
    _error(svc.chat(messages=[{"role": "user", "content": many}]), 400, "messages", "too_many_images")
    r = svc.chat(
        messages=[
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}]},
            _user(),
        ]
    )
    _error(r, 400, "messages.0.content.0", None)
    s = svc.make(_cfg(limits={"max_prompt_tokens": 100}))  # type: ignore[attr-defined]
    two = [_user(), {"role": "assistant", "content": "click(1, 1)"}, _user()]
    _error(s.chat(messages=two), 413, "messages", "context_length_exceeded")
    s = svc.make(_cfg(limits={"max_prompt_chars": 10}))  # type: ignore[attr-defined]
    _error(s.chat(messages=[_user("a long instruction")]), 413, "messages", "too_large")


def test_a_deployments_refusal_keeps_its_status(svc: Service) -> None:
    svc.merged.fail = BadInput("prompt", "the prompt is 600 tokens, over the limit of 512", 413)
    _error(svc.chat(), 413, "messages", "too_large")
    from ray.serve.exceptions import BackPressureError

    svc.merged.fail = BackPressureError(num_queued_requests=8, max_queued_requests=8)
    s = svc.make(fallback_to_dynamic=False)  # type: ignore[attr-defined]
    s.merged.fail = svc.merged.fail
    _error(s.chat(), 429, None, "overloaded")

    class QueueFull(RuntimeError):  # the engine's full queue (moe_core.engine.QueueFull), by name
        pass

    s.merged.fail = QueueFull("merged-calendar: 64 requests queued")
    _error(s.chat(), 429, None, "overloaded")


# ----------------------------------------------------------------------------- messages -> Query
def _request(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "calendar", "messages": [_user()]} | body)


def _convert(req: ChatCompletionRequest, **kw: Any) -> Intake:
    """The chat request as the gateway makes it a query: its messages read, then the pipeline's intake."""
    settings = GatewaySettings.of(CFG)
    conv = asyncio.run(build_conversation(req, settings.api, settings.limits.max_image_bytes, **kw))
    return intake(chat_request(req, conv, settings), settings, "rid")


def test_a_conversation_goes_whole_as_turns() -> None:
    first, second = _png(colour=(9, 9, 9)), _png((96, 64))
    req = _request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            _user("Open the calendar", _data_url(first)),
            {"role": "assistant", "content": [{"type": "text", "text": "click(0, 3)"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Now "},
                    {"type": "text", "text": "click the day"},
                    {"type": "image_url", "image_url": _data_url(second)},  # a bare URL string
                ],
            },
        ]
    )
    conv = _convert(req)
    q = conv.query
    assert q.turns == (
        Turn("system", ("Be brief.",)),
        Turn("user", (0, "Open the calendar")),
        Turn("assistant", ("click(0, 3)",)),
        Turn("user", ("Now ", "click the day", 1)),
    )
    assert q.images == (first, second) and q.image == second  # the routing adapter sees the last one
    assert q.prompt == "Now click the day" and q.request_id == "rid"
    assert q.image_tokens == sum(p.tokens for p in conv.images) and len(conv.images) == 2


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "no image"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "text first"},
                    {"type": "image_url", "image_url": {"url": "@"}},
                ],
            }
        ],
        [{"role": "system", "content": "own system prompt"}, _user()],
        [_user(), {"role": "assistant", "content": "x"}, _user()],
    ],
)
def test_only_the_infer_shaped_request_leaves_turns_empty(messages: list[dict[str, Any]]) -> None:
    for m in messages:
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p["type"] == "image_url" and p["image_url"]["url"] == "@":
                p["image_url"]["url"] = _data_url()
    q = _convert(_request(messages=messages)).query
    assert q.turns and len(q.turns) == len(messages)
    assert q.image == (q.images[-1] if q.images else None)


def test_sampling_from_the_request() -> None:
    s = sampling_of(_request(max_tokens=8, temperature=0.7, top_p=0.9, seed=3, stop="\n"), 16)
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (8, 0.7, 0.9, 3, ("\n",))
    s = sampling_of(_request(max_tokens=8, max_completion_tokens=4, stop=["a", "b"]), 16)
    assert (s.max_tokens, s.stop) == (4, ("a", "b"))
    s = sampling_of(_request(max_tokens=16), 16)
    assert (s.max_tokens, s.temperature, s.top_p, s.seed) == (16, 0.0, 1.0, None)  # greedy by default
    assert sampling_of(_request(), 16).max_tokens is None  # the engine's limits.max_new_tokens
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(ApiError) as e:
            sampling_of(_request(**{field: 17}), 16)
        assert (e.value.status, e.value.param) == (400, field) and "limit of 16" in e.value.message


def test_validation_error_picks_the_most_specific_field() -> None:
    errors = [
        {
            "loc": ("body", "messages", 0, "content", "str"),
            "msg": "Input should be a valid string",
            "type": "string_type",
        },
        {
            "loc": (
                "body",
                "messages",
                0,
                "content",
                "list[tagged-union[TextPart,ImagePart]]",
                0,
                "image_url",
                "image_url",
                "ImageURL",
                "url",
            ),
            "msg": "Input should be a valid string",
            "type": "string_type",
        },
    ]
    e = validation_error(errors)
    assert (e.status, e.param, e.code) == (400, "messages.0.content.0.image_url.url", "invalid_type")


# ----------------------------------------------------------------------------- image URLs
class _ImageServer:
    """A local http server: /ok.png, /big.png, /moved (a redirect)."""

    def __init__(self, body: bytes) -> None:
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "/ok.png")
                    self.end_headers()
                    return
                data = outer.body if self.path == "/ok.png" else outer.body * 1000
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.body = body
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_allow_listed_hosts_are_fetched_with_limits(svc: Service) -> None:
    server = _ImageServer(_png())
    try:
        s = svc.make(_cfg(api={"image_url_hosts": ["127.0.0.1"]}, limits={"max_image_bytes": 50_000}))  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{server.port}"
        r = s.chat(messages=[_user(image=f"{url}/ok.png")])
        assert r.status_code == 200, r.text
        assert s.merged.queries[-1][0].image == _png()
        param = "messages.0.content.0.image_url.url"
        _error(s.chat(messages=[_user(image=f"{url}/moved")]), 400, param, "image_fetch_failed")
        _error(s.chat(messages=[_user(image=f"{url}/big.png")]), 413, param, "too_large")
        _error(
            s.chat(messages=[_user(image=f"http://localhost:{server.port}/ok.png")]),
            400,
            param,
            "image_url_not_allowed",
        )
    finally:
        server.server.shutdown()
    assert host_allowed("cdn.example.com", ["*.example.com"]) and not host_allowed(
        "example.com", ["*.example.com"]
    )
    assert not host_allowed("evilexample.com", ["*.example.com"]) and host_allowed("A.B", ["a.b"])


# ----------------------------------------------------------------------------- streaming
def _events(text: str) -> list[Any]:
    """Server-Sent Events as sent: each 'data: ...' payload, parsed (the last is the string [DONE])."""
    assert text.endswith("\n\n")
    out: list[Any] = []
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_stream_framing(svc: Service) -> None:
    r = svc.chat(stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-moe-adapter"] == "calendar" and r.headers["x-moe-mode"] == "merged"
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "calendar" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and all("usage" in c for c in chunks)
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["moe"]["adapter"] == "calendar" and first["moe"]["images"][0]["tokens"] == 70
    assert len(middle) > 1 and all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == "calendar says Click the day"
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 80,
        "completion_tokens": 5,
        "total_tokens": 85,
        "prompt_tokens_details": {"cached_tokens": 4, "image_tokens": 70},
    }
    plain = _events(svc.chat(stream=True).text)
    assert all("usage" not in c for c in plain[:-1]) and len(plain) == len(events) - 1


def test_stream_through_the_sdk_joins_to_the_non_streamed_text(svc: Service) -> None:
    whole = svc.sdk.chat.completions.create(model="desktop", messages=[_user()])  # type: ignore[list-item]
    parts, usage = [], None
    for chunk in svc.sdk.chat.completions.create(
        model="desktop",
        messages=[_user()],
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[list-item]
    ):
        parts += [c.delta.content for c in chunk.choices if c.delta.content]
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content and len(parts) > 1
    assert usage == whole.usage


def test_stream_length_finish_reason(svc: Service) -> None:
    events = _events(svc.chat(stream=True, max_tokens=4).text)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert svc.merged.queries[-1][0].sampling.max_tokens == 4


def test_mid_stream_error_is_an_error_event_before_done(svc: Service) -> None:
    svc.merged.fail_after = 2
    r = svc.chat(stream=True)
    assert r.status_code == 200
    events = _events(r.text)
    assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}
    assert events[-2]["error"]["type"] == "server_error" and "mid-stream" in events[-2]["error"]["message"]
    assert len(svc.dynamic.queries) == 0  # answered once: no fallback after the first chunk
    assert svc.handles["merged"].streams[-1].cancelled
    svc.merged.fail_after = 2
    with pytest.raises(openai.APIError, match="mid-stream"):
        for _ in svc.sdk.chat.completions.create(model="calendar", messages=[_user()], stream=True):  # type: ignore[list-item]
            pass


def test_stream_falls_back_before_its_first_chunk(svc: Service) -> None:
    svc.merged.fail = RuntimeError("replica died")
    r = svc.chat(stream=True)
    assert r.headers["x-moe-fallback"] == "true" and r.headers["x-moe-mode"] == "dynamic"
    events = _events(r.text)
    assert events[0]["moe"]["fallback"] is True and events[-1] == "[DONE]"
    s = svc.make(fallback_to_dynamic=False)  # type: ignore[attr-defined]
    s.merged.fail = RuntimeError("replica died")
    _error(s.chat(stream=True), 503, None, "unavailable")  # nothing sent yet: a plain error response
    s.merged.fail = BadInput("prompt", "too long", 413)
    _error(s.chat(stream=True), 413, "messages", "too_large")


def test_auto_stream_is_answered_by_the_routing_hop_when_it_decides_dynamic(svc: Service) -> None:
    """A routed stream takes one hop when the decision is dynamic (the routing replica streams the
    answer after its decision), two when it is merged; the text streams in pieces either way."""
    svc.dynamic.verdict = Classification("login-window", 0.8, {"login-window": 0.8})
    events = _events(svc.chat(model="auto", stream=True).text)
    assert events[0]["moe"]["routed_via"] == "router" and events[0]["moe"]["confidence"] == 0.8
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-2]]
    assert "".join(pieces) == "login-window says Click the day" and len(pieces) > 1
    assert len(svc.handles["dynamic"].streams) == 1 and len(svc.dynamic.routed) == 1  # one call: route_stream
    assert svc.dynamic.queries[-1][1] == "login-window" and not svc.merged.queries
    svc.dynamic.verdict = Classification("calendar", 0.9, {"calendar": 0.9})
    events = _events(svc.chat(model="auto", stream=True).text)
    assert events[0]["moe"]["mode"] == "merged" and len(svc.handles["merged"].streams) == 1
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
    assert text == "calendar says Click the day"
    svc.dynamic.verdict = Classification("calendar", 0.3, {"calendar": 0.3, "login-window": 0.2})
    _error(svc.chat(model="auto", stream=True), 422, "model", "below_confidence_threshold")
    svc.dynamic.fail_after = 1  # the routing hop fails mid-answer: an error event, never answered twice
    svc.dynamic.verdict = Classification("login-window", 0.8, {"login-window": 0.8})
    events = _events(svc.chat(model="auto", stream=True).text)
    assert set(events[-2]) == {"error"} and "mid-stream" in events[-2]["error"]["message"]
    assert svc.handles["dynamic"].streams[-1].cancelled and len(svc.dynamic.queries) == 2


# ----------------------------------------------------------------------------- API keys
def test_api_keys_from_the_environment(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TEST_KEY", "sk-right")
    s = svc.make(_cfg(api={"key_env": "MOE_TEST_KEY"}))  # type: ignore[attr-defined]
    with pytest.raises(openai.AuthenticationError):
        s.sdk.models.list()
    r = s.http.get("/v1/models")
    _error(r, 401, None, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    _error(s.http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401, None)
    _error(
        s.http.post("/v1/chat/completions", content=b"{bad", headers={"Authorization": "Basic x"}), 401, None
    )
    r = s.http.post("/infer", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"  # /infer's own shape
    assert s.http.get("/adapters").status_code == 401
    assert s.http.get("/healthz").status_code == 200 and s.http.get("/openapi.json").status_code == 200
    ok = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-right", http_client=s.http, max_retries=0)
    assert "calendar" in {m.id for m in ok.models.list()}
    assert ok.chat.completions.create(model="calendar", messages=[_user()]).choices[0].message.content  # type: ignore[list-item]
    r = s.http.post("/infer", json={"prompt": "x"}, headers={"Authorization": "bearer sk-right"})
    assert r.status_code == 422  # past the key: /infer's own validation


def test_api_keys_from_a_file_rotate_without_restart(svc: Service, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nsk-old\n\n")
    s = svc.make(_cfg(api={"key_file": str(keys)}))  # type: ignore[attr-defined]
    auth = {"Authorization": "Bearer sk-old"}
    assert s.http.get("/v1/models", headers=auth).status_code == 200
    keys.write_text("sk-new\nsk-newer\n")
    assert s.http.get("/v1/models", headers=auth).status_code == 401
    assert s.http.get("/v1/models", headers={"Authorization": "Bearer sk-newer"}).status_code == 200
    keys.unlink()  # a missing file holds no key: closed
    assert s.http.get("/v1/models", headers={"Authorization": "Bearer sk-newer"}).status_code == 401


def test_keys_on_without_a_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MOE_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="no API key found"):
        ApiKeys("MOE_TEST_KEY", str(tmp_path / "missing"))
    assert ApiKeys.of(CFG.api) is None  # off by default


def test_openapi_schema_has_the_v1_routes(svc: Service) -> None:
    schema = svc.http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/infer"} <= set(schema["paths"])
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert "400" in chat["responses"] and "401" in chat["responses"]


def test_infer_reports_where_its_time_went_by_hop(svc: Service) -> None:
    """/infer's Server-Timing header: the gateway's whole time, the replica calls as it saw them, and
    what the answering replica reported of its method and its engine (python -m benchmarks reads it)."""
    r = svc.http.post(
        "/infer", json={"image_b64": _data_url(), "prompt": "Click the day", "expert": "calendar"}
    )
    assert r.status_code == 200, r.text
    hops = {p.split(";dur=")[0]: float(p.split(";dur=")[1]) for p in r.headers["server-timing"].split(", ")}
    assert set(hops) == {"gateway", "hops", "replica", "engine"}
    assert hops["gateway"] >= hops["hops"] > 0 and hops["replica"] == hops["engine"] == 0.0  # fakes report 0
    from benchmarks.serve_bench import hops as by_hop

    split = by_hop(r.headers["server-timing"], 1.0)  # a client that waited 1 s
    assert set(split) == {"proxy", "gateway", "handle", "replica", "engine"}
    assert abs(sum(split.values()) - 1.0) < 1e-9 and split["proxy"] == 1.0 - hops["gateway"] / 1e3
    bad = svc.http.post("/infer", json={"image_b64": "not base64!", "prompt": "x", "expert": "calendar"})
    assert bad.status_code == 422 and "gateway;dur=" in bad.headers["server-timing"]


def test_the_middlewares_read_the_replicas_own_guards_after_serve_pickles_the_app() -> None:
    """Serve ships the ingress app pickled by value: the middlewares must still find the GUARDS the
    replica's gateway fills in (an object handed to them was a copy, and API keys went unchecked)."""
    from ray import cloudpickle

    from deployments.gateway import api as api_module

    shipped = cloudpickle.loads(cloudpickle.dumps(api_module.api))
    for middleware in shipped.user_middleware:
        assert middleware.kwargs["settings"]() is api_module.GUARDS, middleware
