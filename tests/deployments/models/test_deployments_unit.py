"""The deployments' logic on a fake engine and fake handles: batching, refresh, reconfigure, routing in
place, fallback. Fast, no model and no Ray cluster (the end-to-end tests run the real ones)."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deployments.gateway.errors import ServiceUnavailable
from deployments.gateway.service import Gateway
from deployments.messages import Answer, Chunk, Query, RouteRequest, RouteResult
from deployments.models.dynamic import AdapterNotServed, DynamicLoRA, NotConfigured
from deployments.models.merged import MergedModel, ModelUnavailable
from deployments.routing import RoutingPolicy
from deployments.schemas import BadInput, InferRequest
from deployments.settings import DynamicSettings, GatewaySettings, MergedSettings
from moe_core.config import ConfigError, DeploymentConfig, EngineSettings, GatewayLive, LiveSettings
from moe_core.engine import Classification, GenerationRequest
from moe_core.engine.request import Completion, Delta, PromptTooLong, Timings
from moe_core.generation import SamplingParams
from moe_core.storage.store import Storage
from moe_core.structured import Constraint
from moe_core.vision import PixelBounds

#: One event loop for the module (a replica has one loop; these tests share one too).
_LOOP = asyncio.new_event_loop()


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        _LOOP.run_until_complete(test(*args, **kwargs))

    return run


class FakeEngine:
    """Answers '<adapter>@<tag>:<prompt>' where tag is the loaded adapter file's content."""

    verdict = Classification("calendar", 0.9, {"calendar": 0.9, "login-window": 0.1})

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.loaded: dict[str, str] = {}
        self.batches: list[list[str | None]] = []
        self._pending: list[GenerationRequest] = []
        self.broken = False
        self._last = (0, 0)
        self.classified = 0
        self.slots = (99, 16)
        self.params: list[SamplingParams] = []

    async def generate(
        self, request: GenerationRequest, params: SamplingParams, *, request_id: str = ""
    ) -> Completion:
        """Requests that arrive together form one batch, as the scheduler's running batch does; a prompt
        over the limit (a token a word) is refused before it joins, as the scheduler's check does."""
        words = len(request.prompt.split())
        if words > CFG.limits.max_prompt_tokens:
            raise PromptTooLong(
                f"the prompt is {words} tokens, over the limit of {CFG.limits.max_prompt_tokens}"
            )
        self._pending.append(request)
        self.params.append(params)
        await asyncio.sleep(0.05)  # requests arriving within this window share the "forward"
        if self._pending:
            batch, self._pending = self._pending, []
            self.batches.append([r.adapter for r in batch])
            self._last = (len(batch), len({r.adapter for r in batch}))
        rows, adapters = self._last
        return Completion(self._text(request), "stop", 3, 1, rows, adapters, Timings(0.0, 0.0, 0.0, 0.0))

    async def stream(
        self, request: GenerationRequest, params: SamplingParams, *, request_id: str = ""
    ) -> AsyncIterator[Delta]:
        done = await self.generate(request, params, request_id=request_id)
        half = len(done.text) // 2
        yield Delta(done.text[:half])
        yield Delta(done.text[half:], "stop", 3, 1, 1, 1, done.timings)

    def in_use(self) -> set[str]:
        return set()

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError("device lost")

    def _text(self, r: GenerationRequest) -> str:
        return f"{r.adapter}@{self.loaded.get(r.adapter or '', '-')}:{r.prompt}"

    async def classify(
        self, request: GenerationRequest, labels: Sequence[str], *, request_id: str = ""
    ) -> Classification:
        self.classified += 1
        return self.verdict

    def load_adapter(self, name: str, path: str | Path) -> None:
        if name not in self.loaded and len(self.loaded) >= self.slots[0]:  # as the real engine's slots
            raise RuntimeError(f"all {self.slots[0]} slots are taken")
        if (Path(path) / "tag").read_text() == "bad":  # as the slots refuse a rank mismatch: nothing touched
            raise ValueError(f"adapter {name!r}: LoRA pair does not fit rank 16; not loaded")
        self.loaded[name] = (Path(path) / "tag").read_text()

    def unload_adapter(self, name: str) -> None:
        self.loaded.pop(name, None)

    def set_lora_slots(self, slots: int, max_rank: int) -> None:
        assert len(self.loaded) <= slots
        self.slots = (slots, max_rank)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _q(prompt: str) -> Query:
    return Query(_png(), prompt, PixelBounds(1024, 4096), 4)


def _publish(st: Storage, tmp: Path, kind: Any, name: str, tag: str) -> str:
    d = tmp / f"{kind}-{name}-{tag}"
    d.mkdir()
    (d / "tag").write_text(tag)
    return st.publish(kind, name, d)


CFG = DeploymentConfig.from_dict(
    {
        "router": {"adapter": "router", "labels": {0: "calendar", 1: "login-window"}},
        "merged": {"adapters": [{"name": "calendar"}], "refresh_interval_s": 0.0},
        "dynamic": {"adapters": ["login-window", "desktop"], "refresh_interval_s": 0.0},
        "limits": {"max_image_pixels": 4 * 1024 * 1024},
    }
)
LIVE = LiveSettings.of(CFG)


@pytest.fixture
def store(tmp_path: Path) -> Storage:
    st = Storage(str(tmp_path / "storage"))
    for kind, name in (("expert", "calendar"), ("expert", "login-window"), ("router", "router")):
        _publish(st, tmp_path, kind, name, "v1")
    return st


def _dynamic(store: Storage, configure: bool = True) -> tuple[DynamicLoRA, FakeEngine]:
    engine = FakeEngine()

    def factory(settings: EngineSettings, path: Path | None, name: str, rows: int, queue: int) -> FakeEngine:
        return engine

    d = DynamicLoRA(DynamicSettings.of(CFG), engine_factory=factory, storage=store)
    if configure:
        d.reconfigure(LIVE.dynamic.model_dump())
    return d, engine


@on_loop
async def test_dynamic_batches_mixed_adapters_into_one_forward(store: Storage) -> None:
    d, engine = _dynamic(store)
    answers = await asyncio.gather(
        d.generate(_q("a"), "calendar"), d.generate(_q("b"), "login-window"), d.generate(_q("c"), None)
    )
    assert [a.text for a in answers] == ["calendar@v1:a", "login-window@v1:b", "None@-:c"]
    assert all(isinstance(a, Answer) and a.mode == "dynamic" for a in answers)
    assert [set(b) for b in engine.batches] == [{"calendar", "login-window", None}]  # one forward
    assert answers[0].version == store.current_version("expert", "calendar") and answers[2].version is None
    assert d.stats().max_adapters_in_one_step == 3


@on_loop
async def test_dynamic_one_missing_adapter_fails_only_its_row(store: Storage) -> None:
    d, _ = _dynamic(store)
    ok, missing = await asyncio.gather(
        d.generate(_q("a"), "calendar"), d.generate(_q("b"), "desktop"), return_exceptions=True
    )
    assert isinstance(ok, Answer) and ok.text == "calendar@v1:a"
    assert isinstance(missing, AdapterNotServed) and "no published version" in str(missing)
    with pytest.raises(AdapterNotServed, match="not served"):
        await d.generate(_q("x"), "appointment")


@on_loop
async def test_a_broken_pointer_fails_only_its_adapters_rows(store: Storage) -> None:
    d, _ = _dynamic(store)
    (Path(store.versions_dir("expert", "login-window")) / "CURRENT").write_text('{"version": "../../x"}')
    ok, broken = await asyncio.gather(
        d.generate(_q("a"), "calendar"), d.generate(_q("b"), "login-window"), return_exceptions=True
    )
    assert isinstance(ok, Answer) and ok.text == "calendar@v1:a"
    assert isinstance(broken, AdapterNotServed) and "no usable version" in str(broken)


@on_loop
async def test_an_adapter_that_fails_to_load_fails_only_its_rows(store: Storage, tmp_path: Path) -> None:
    d, _ = _dynamic(store)
    assert (await d.generate(_q("a"), "login-window")).text == "login-window@v1:a"
    _publish(store, tmp_path, "expert", "login-window", "bad")  # a new version the engine refuses
    _publish(store, tmp_path, "expert", "desktop", "bad")  # an adapter whose only version is refused
    ok, kept, refused = await asyncio.gather(
        d.generate(_q("b"), "calendar"),
        d.generate(_q("c"), "login-window"),
        d.generate(_q("d"), "desktop"),
        return_exceptions=True,
    )
    assert isinstance(ok, Answer) and ok.text == "calendar@v1:b"
    assert isinstance(kept, Answer) and kept.text == "login-window@v1:c"  # the loaded version stays
    assert isinstance(refused, AdapterNotServed) and "failed to load" in str(refused)


@on_loop
async def test_dynamic_picks_up_a_new_version_without_restart(store: Storage, tmp_path: Path) -> None:
    d, _ = _dynamic(store)
    assert (await d.generate(_q("a"), "calendar")).text == "calendar@v1:a"
    v2 = _publish(store, tmp_path, "expert", "calendar", "v2")
    answer = await d.generate(_q("a"), "calendar")
    assert answer.text == "calendar@v2:a" and answer.version == v2


@on_loop
async def test_dynamic_reconfigure_validates_and_applies(store: Storage) -> None:
    d, engine = _dynamic(store)
    await d.generate(_q("a"), "login-window")
    assert "login-window" in engine.loaded
    for bad, field in (
        ({"adapters": "calendar", "max_loaded_adapters": 2}, "adapters"),
        ({"adapters": [], "max_loaded_adapters": 0}, "max_loaded_adapters"),
        ({"adapters": ["Bad Name"], "max_loaded_adapters": 2}, "adapters.0"),
        ({"adapters": []}, "max_loaded_adapters"),
        ({"adapters": [], "max_loaded_adapters": 2, "lru": 3}, "lru"),
    ):
        with pytest.raises(ConfigError, match=rf"DynamicLoRA user_config: {field}"):
            d.reconfigure(bad)
    assert d.live == LIVE.dynamic  # a refused reconfigure changes nothing
    d.reconfigure({"adapters": ["desktop"], "max_loaded_adapters": 1})
    assert "login-window" not in engine.loaded and d.cache is not None and d.cache.capacity == 1
    assert engine.slots == (2, CFG.dynamic.max_lora_rank)  # the LRU's slot and the router's
    with pytest.raises(AdapterNotServed):
        await d.generate(_q("a"), "login-window")
    assert (await d.generate(_q("a"), "calendar")).text == "calendar@v1:a"  # merged: always served
    # an LRU of one and the router: two slots; each new adapter evicts the last before it loads
    d.reconfigure({"adapters": ["login-window"], "max_loaded_adapters": 1})
    await d.route(RouteRequest(_q("p"), _policy()))  # the router takes its own slot
    for name in ("login-window", "calendar", "login-window"):
        assert (await d.generate(_q("b"), name)).text == f"{name}@v1:b"
        assert sorted(engine.loaded) == sorted([name, "router"])


@on_loop
async def test_dynamic_without_live_settings_is_unhealthy_and_refuses(store: Storage) -> None:
    d, _ = _dynamic(store, configure=False)
    with pytest.raises(NotConfigured):
        d.check_health()
    with pytest.raises(NotConfigured):
        await d.generate(_q("a"), "calendar")
    d.reconfigure(LIVE.dynamic.model_dump())
    d.check_health()


def _policy(**live: Any) -> RoutingPolicy:
    return RoutingPolicy(CFG.router.labels, {"calendar"}, LIVE.gateway.model_copy(update=live))


@on_loop
async def test_route_answers_in_place_only_when_the_decision_is_dynamic(store: Storage) -> None:
    d, engine = _dynamic(store)
    merged = await d.route(RouteRequest(_q("p"), _policy()))
    assert merged.decision.target == "merged" and merged.answer is None and engine.batches == []
    here = await d.route(RouteRequest(_q("p"), _policy(), prefer_merged=False))
    assert here.answer is not None and here.answer.text == "calendar@v1:p"
    engine.verdict = Classification("login-window", 0.3, {"login-window": 0.3, "calendar": 0.7})
    rejected = await d.route(RouteRequest(_q("p"), _policy()))
    assert rejected.decision.action == "reject" and rejected.answer is None
    base = await d.route(RouteRequest(_q("p"), _policy(below_threshold="base")))
    assert base.answer is not None and base.answer.adapter is None
    assert base.decision.routed_via == "router-below-threshold"
    assert engine.classified == 4


@on_loop
async def test_route_stream_sends_the_decision_then_the_answer_only_when_it_is_dynamic(
    store: Storage,
) -> None:
    d, engine = _dynamic(store)
    merged = [x async for x in d.route_stream(RouteRequest(_q("p"), _policy()))]
    assert len(merged) == 1 and isinstance(merged[0], RouteResult) and merged[0].answer is None
    assert merged[0].decision.target == "merged" and engine.batches == []
    here = [x async for x in d.route_stream(RouteRequest(_q("p"), _policy(), prefer_merged=False))]
    decision, *chunks = here
    assert isinstance(decision, RouteResult) and decision.decision.target == "dynamic"
    assert all(isinstance(c, Chunk) for c in chunks) and len(chunks) > 1
    assert "".join(c.text for c in chunks) == "calendar@v1:p" and chunks[-1].finish_reason == "stop"  # type: ignore[union-attr]
    engine.verdict = Classification("login-window", 0.3, {"login-window": 0.3, "calendar": 0.7})
    rejected = [x async for x in d.route_stream(RouteRequest(_q("p"), _policy()))]
    assert len(rejected) == 1 and rejected[0].decision.action == "reject"  # type: ignore[union-attr]


@on_loop
async def test_each_expert_answers_under_its_declared_grammar_merged_and_dynamic(
    store: Storage, tmp_path: Path
) -> None:
    """The merged model has no adapter of its own: it still answers under its expert's grammar (it did
    not, before the grammar was looked up by the expert it serves); a request's own format wins."""
    cfg = DeploymentConfig.from_dict(
        CFG.model_dump(mode="json")
        | {"outputs": {"calendar": {"regex": "a+"}, "login-window": {"choice": ["x"]}}}
    )
    engines: list[FakeEngine] = []

    def factory(settings: EngineSettings, path: Path | None, name: str, rows: int, queue: int) -> FakeEngine:
        engines.append(FakeEngine(path))
        return engines[-1]

    _publish(store, tmp_path, "merged", "calendar", "m1")
    m = MergedModel(MergedSettings.of(cfg, "calendar"), engine_factory=factory, storage=store)
    await m.generate(_q("a"), "calendar")
    d = DynamicLoRA(DynamicSettings.of(cfg), engine_factory=factory, storage=store)
    d.reconfigure(LiveSettings.of(cfg).dynamic.model_dump())
    await d.generate(_q("b"), "login-window")
    await d.generate(_q("c"), "calendar")  # the fallback of the merged one: the same grammar
    await d.generate(_q("d"), None)  # the base model: free
    own = Query(
        _png(),
        "e",
        PixelBounds(1024, 4096),
        4,
        sampling=SamplingParams(constraint=Constraint.regex("b", "x")),
    )
    await d.generate(own, "login-window")
    free = Query(_png(), "f", PixelBounds(1024, 4096), 4, sampling=SamplingParams(expert_grammar=False))
    await d.generate(free, "login-window")  # tools in auto mode: no grammar
    got = [p.constraint for e in engines for p in e.params]
    assert [(c.kind, c.value, c.param) if c else None for c in got] == [
        ("regex", "a+", "outputs.calendar"),
        ("choice", '["x"]', "outputs.login-window"),
        ("regex", "a+", "outputs.calendar"),
        None,
        ("regex", "b", "x"),
        None,
    ]


@on_loop
async def test_merged_waits_for_a_version_then_serves_it(store: Storage, tmp_path: Path) -> None:
    engines: list[FakeEngine] = []

    def factory(settings: EngineSettings, path: Path | None, name: str, rows: int, queue: int) -> FakeEngine:
        engines.append(FakeEngine(path))
        return engines[-1]

    m = MergedModel(MergedSettings.of(CFG, "calendar"), engine_factory=factory, storage=store)
    with pytest.raises(ModelUnavailable):
        await m.generate(_q("a"))
    v1 = _publish(store, tmp_path, "merged", "calendar", "m1")
    with pytest.raises(ModelUnavailable):  # the load runs in the background: this request falls back
        await m.generate(_q("a"))
    assert m._task is not None
    await m._task
    answer = await m.generate(_q("a"))
    assert (answer.mode, answer.adapter, answer.version) == ("merged", "calendar", v1)
    assert engines[0].path is not None and (engines[0].path / "tag").read_text() == "m1"
    assert m.status().version == v1 and m.status().ready
    m.check_health()
    engines[0].broken = True  # a lost device makes the replica unhealthy: Serve replaces it
    with pytest.raises(RuntimeError, match="device lost"):
        m.check_health()


@on_loop
async def test_a_prompt_the_merged_engine_refuses_is_the_clients_413_not_a_fallback(
    store: Storage, tmp_path: Path
) -> None:
    """The engine refuses a prompt that cannot fit its KV cache even alone: a 413 naming the prompt, on the
    whole and the streamed path, never an error that would send it on to the dynamic deployment."""

    class Refusing(FakeEngine):
        async def generate(self, request: GenerationRequest, params: SamplingParams, **kw: Any) -> Completion:
            raise PromptTooLong(
                "the prompt is 9000 tokens: 563 KV cache pages, more than the 100 this replica has"
            )

    m = MergedModel(
        MergedSettings.of(CFG, "calendar"), engine_factory=lambda *a: Refusing(a[1]), storage=store
    )
    _publish(store, tmp_path, "merged", "calendar", "m1")
    with pytest.raises(ModelUnavailable):
        await m.generate(_q("a"))
    assert m._task is not None
    await m._task
    with pytest.raises(BadInput) as e:
        await m.generate(_q("a"))
    assert (e.value.field, e.value.status) == ("prompt", 413) and "KV cache" in str(e.value)
    with pytest.raises(BadInput):
        async for _ in m.stream(_q("a")):
            pass


@on_loop
async def test_a_merged_model_of_an_older_adapter_version_is_stale_and_falls_back(
    store: Storage, tmp_path: Path
) -> None:
    """Merged and dynamic must not disagree: a merge of an older adapter version is not served."""

    def factory(settings: EngineSettings, path: Path | None, name: str, rows: int, queue: int) -> FakeEngine:
        return FakeEngine(path)

    merged_from = store.current_version("expert", "calendar")
    src = tmp_path / "merged-src"
    src.mkdir()
    (src / "tag").write_text("m1")
    (src / "merge_metadata.json").write_text(json.dumps({"source_version": merged_from}))
    store.publish("merged", "calendar", src)
    m = MergedModel(MergedSettings.of(CFG, "calendar"), engine_factory=factory, storage=store)
    assert (await m.generate(_q("a"))).mode == "merged" and m.status().ready
    _publish(store, tmp_path, "expert", "calendar", "v2")  # a new adapter version is deployed
    if m._task is not None:
        await m._task
    await m._check()  # what the next refresh runs in the background
    with pytest.raises(ModelUnavailable, match="stale: merged from adapter version"):
        await m.generate(_q("a"))
    assert not m.status().ready


class FakeHandle:
    """A deployment handle whose methods run local coroutines (``handle.method.remote(...)``)."""

    def __init__(self, target: Any = None, fail: bool = False) -> None:
        self.target, self.fail, self.calls = target, fail, 0

    def __getattr__(self, method: str) -> Any:
        handle = self

        class _Method:
            def remote(self, *args: Any) -> asyncio.Task[Any]:
                handle.calls += 1

                async def run() -> Any:
                    if handle.fail:
                        raise RuntimeError("replica died")
                    return await getattr(handle.target, method)(*args)

                return asyncio.ensure_future(run())

        return _Method()


def _gateway(dynamic: DynamicLoRA, merged: FakeHandle, **live: Any) -> Gateway:
    g = Gateway(GatewaySettings.of(CFG), FakeHandle(dynamic), {"calendar": merged})
    g.reconfigure(LIVE.gateway.model_dump() | live)
    return g


def _req(**kw: Any) -> InferRequest:
    return InferRequest(image_b64=base64.b64encode(_png()).decode(), prompt="p", **kw)


@on_loop
async def test_gateway_falls_back_to_dynamic_once_when_merged_fails(store: Storage) -> None:
    d, engine = _dynamic(store)
    broken = FakeHandle(fail=True)
    r = await _gateway(d, broken)._infer(_req(expert="calendar"))
    assert (r.mode, r.fallback, r.task_output, broken.calls) == ("dynamic", True, "calendar@v1:p", 1)
    assert engine.batches == [["calendar"]]  # generated exactly once
    with pytest.raises(ServiceUnavailable, match="replica died"):
        await _gateway(d, broken, fallback_to_dynamic=False)._infer(_req(expert="calendar"))


@on_loop
async def test_gateway_routes_to_merged_and_rejects_when_unsure(store: Storage, tmp_path: Path) -> None:
    d, engine = _dynamic(store)
    _publish(store, tmp_path, "merged", "calendar", "m1")
    merged = MergedModel(
        MergedSettings.of(CFG, "calendar"), engine_factory=lambda s, p, n, r, q: FakeEngine(p), storage=store
    )
    r = await _gateway(d, FakeHandle(merged))._infer(_req())
    assert (r.mode, r.adapter, r.routed_via, r.confidence) == ("merged", "calendar", "router", 0.9)
    engine.verdict = Classification("calendar", 0.2, {"calendar": 0.2, "login-window": 0.1})
    with pytest.raises(BadInput, match=r"below 0\.5.*candidates: calendar"):
        await _gateway(d, FakeHandle(merged))._infer(_req())


def test_gateway_reconfigure_refuses_bad_live_settings() -> None:
    g = Gateway(GatewaySettings.of(CFG), None, {"calendar": FakeHandle()})
    with pytest.raises(ServiceUnavailable, match="no live settings"):
        _ = g.policy
    with pytest.raises(ConfigError, match="Gateway user_config: confidence_threshold"):
        g.reconfigure(LIVE.gateway.model_dump() | {"confidence_threshold": 2})
    with pytest.raises(ConfigError, match="router labels name adapters \\['login-window'\\]"):
        g.reconfigure(LIVE.gateway.model_dump() | {"dynamic_adapters": []})
    g.reconfigure(LIVE.gateway.model_dump())
    assert g.policy.live == GatewayLive.of(CFG)


def test_static_settings_do_not_depend_on_live_fields() -> None:
    """What the deployments are built with is the same whatever the live fields say."""
    data = CFG.model_dump(mode="json")
    data["gateway"]["prefer_merged"] = False
    data["router"]["confidence_threshold"] = 0.9
    data["dynamic"]["max_loaded_adapters"] = 2
    other = DeploymentConfig.from_dict(data)
    assert GatewaySettings.of(other) == GatewaySettings.of(CFG)
    assert DynamicSettings.of(other) == DynamicSettings.of(CFG)
    assert MergedSettings.of(other, "calendar") == MergedSettings.of(CFG, "calendar")
    static, live = DeploymentConfig.from_static(CFG.static_dump())
    assert live is None and GatewaySettings.of(static) == GatewaySettings.of(CFG)
    assert DeploymentConfig.from_static(data)[1] == LiveSettings.of(other)


@on_loop
async def test_prompt_over_the_token_limit_is_refused_before_batching(store: Storage) -> None:
    """The engine refuses a prompt over limits.max_prompt_tokens (its scheduler's check, the replica's
    only one): the client's 413 naming the prompt, whole and streamed; the refused row never joins."""
    d, engine = _dynamic(store)
    limit = CFG.limits.max_prompt_tokens
    long = Query(_png(), "word " * (limit + 1), PixelBounds(1024, 4096), 4)
    ok, refused = await asyncio.gather(
        d.generate(_q("a"), "calendar"), d.generate(long, "calendar"), return_exceptions=True
    )
    assert isinstance(ok, Answer) and engine.batches == [["calendar"]]  # the refused row never joined
    assert isinstance(refused, BadInput) and refused.field == "prompt" and refused.status == 413
    assert f"over the limit of {limit}" in refused.message
    with pytest.raises(BadInput) as e:
        async for _ in d.stream(long, "calendar"):
            pass
    assert (e.value.field, e.value.status) == ("prompt", 413)


def test_bad_input_crosses_a_handle_whole() -> None:
    """Ray pickles what a deployment raises; the gateway must get the same field, message and status."""
    import pickle

    from ray.exceptions import RayTaskError

    e = pickle.loads(pickle.dumps(BadInput("prompt", "too long", 413)))
    assert (e.field, e.message, e.status) == ("prompt", "too long", 413)
    wrapped = RayTaskError("generate", "traceback", e)
    assert wrapped.cause is e


@on_loop
async def test_gateway_reports_image_size_and_refuses_oversized_images(store: Storage) -> None:
    d, _ = _dynamic(store)
    g = _gateway(d, FakeHandle(fail=True))
    buf = io.BytesIO()
    Image.new("RGB", (1920, 1080)).save(buf, format="PNG")
    wide = base64.b64encode(buf.getvalue()).decode()
    r = await g._infer(InferRequest(image_b64=wide, prompt="p", expert="login-window"))
    assert (r.image.width, r.image.height) == (1920, 1080)
    assert r.image.model_width * r.image.model_height <= CFG.limits.max_pixels
    assert (
        r.image.tokens == (r.image.model_width // 32) * (r.image.model_height // 32) == r.usage.image_tokens
    )
    assert abs(r.image.model_width / r.image.model_height - 16 / 9) < 32 / r.image.model_height
    small = await g._infer(
        InferRequest(image_b64=wide, prompt="p", expert="login-window", max_pixels=64 * 32 * 32)
    )
    assert small.image.tokens <= 64 < r.image.tokens
    for kw, field in (
        ({"max_pixels": CFG.limits.max_pixels + 1}, "max_pixels"),
        ({"min_pixels": 1}, "min_pixels"),
    ):
        with pytest.raises(BadInput) as e:
            await g._infer(InferRequest(image_b64=wide, prompt="p", expert="login-window", **kw))
        assert e.value.field == field and "outside the configured" in e.value.message
    limits = CFG.limits.model_copy(update={"max_prompt_tokens": 100})
    tight = Gateway(
        GatewaySettings.of(CFG).model_copy(update={"limits": limits}),
        FakeHandle(d),
        {"calendar": FakeHandle()},
    )
    tight.reconfigure(LIVE.gateway.model_dump())
    with pytest.raises(BadInput) as e:
        await tight._infer(InferRequest(image_b64=wide, prompt="p", expert="login-window"))
    assert (
        e.value.field == "image_b64"
        and e.value.status == 413
        and "over the prompt limit of 100" in e.value.message
    )


def test_expected_replica_errors_are_logged_in_one_line_at_their_level() -> None:
    """Serve logs whatever a replica raises at ERROR with a traceback ("Request failed."): a client's bad
    request is an INFO line and a merged model not up a WARNING (the gateway falls back); anything else
    stays an ERROR with its traceback."""
    import logging

    from deployments.observability import ReplicaErrorLog

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("test.replica")
    log.propagate, handler = False, Keep()
    log.addHandler(handler)
    log.addFilter(ReplicaErrorLog({BadInput: logging.INFO, ModelUnavailable: logging.WARNING}))
    for exc in (BadInput("prompt", "too long", 413), ModelUnavailable("serves None"), RuntimeError("bug")):
        try:
            raise exc
        except Exception:
            log.exception("Request failed.")
    log.error("Request failed.")  # no exception: untouched
    assert [(r.levelname, r.exc_info is None) for r in seen] == [
        ("INFO", True),
        ("WARNING", True),
        ("ERROR", False),
        ("ERROR", True),
    ]
    assert seen[0].getMessage() == "Request refused: BadInput: prompt: too long"
    assert seen[2].getMessage() == "Request failed."


def test_an_answer_and_a_chunk_are_the_engines_values_plus_who_answered_and_survive_pickling() -> None:
    """Ray pickles them between replicas: the engine's fields come through as the engine made them."""
    import pickle

    from deployments.messages import Chunk
    from moe_core.answers import TokenLogprob

    timings = Timings(0.01, 0.02, 0.05, 0.01)
    done = Completion("click(1, 2)", "length", 30, 4, 3, 2, timings, 8, (TokenLogprob("c", -0.1),))
    answer = Answer.of(done, "calendar", "dynamic", "v2", replica_s=0.07)
    assert pickle.loads(pickle.dumps(answer)) == answer
    assert (answer.text, answer.finish_reason, answer.batch_size, answer.cached_tokens) == (
        "click(1, 2)",
        "length",
        3,
        8,
    )
    assert (answer.adapter, answer.mode, answer.version, answer.engine_s) == (
        "calendar",
        "dynamic",
        "v2",
        0.05,
    )
    chunk = Chunk.of(Delta("cl", None, 30, 1), "calendar", "merged", "m1")
    assert pickle.loads(pickle.dumps(chunk)) == chunk
    assert (chunk.text, chunk.finish_reason, chunk.mode, chunk.timings) == ("cl", None, "merged", None)
    whole = Chunk.of(answer, answer.adapter, answer.mode, answer.version)  # an answer as one last chunk
    assert (whole.text, whole.finish_reason, whole.logprobs) == (answer.text, "length", answer.logprobs)
