"""Further full models (config ``models``, e.g. chandra) on fake deployments: listed with their own limits,
addressable by name on both APIs, checked against their own limits, answered by their own deployment
only (never the dynamic one), and the merged machinery serving a published checkpoint of its own."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.gateway.api import GUARDS
from deployments.models.merged import FullModel, ModelUnavailable
from deployments.openai_api.models import model_list
from deployments.routing import RoutingPolicy
from deployments.settings import FullModelSettings, GatewaySettings
from moe_core.answers import Classification
from moe_core.config import DeploymentConfig, EngineSettings, LiveSettings
from moe_core.storage.store import Storage
from tests.deployments.models.test_deployments_unit import FakeEngine, _publish, _q
from tests.deployments.openai_api.test_openai_unit import (
    FakeHandle,
    FakeModel,
    Service,
    _cfg,
    _data_url,
    _error,
    _png,
    _user,
)

#: ``doc``: a further model with its own limits, wider than the server's for answers, narrower for images.
DOC_LIMITS = {"max_completion_tokens": 12384, "min_pixels": 4 * 32 * 32, "max_pixels": 16 * 32 * 32}
CFG = _cfg()
DOC_CFG = DeploymentConfig.from_dict(
    CFG.model_dump(mode="json") | {"models": [{"name": "doc", "limits": DOC_LIMITS}]}
)


def test_models_list_shows_a_further_model_with_its_own_limits() -> None:
    settings = GatewaySettings.of(DOC_CFG)
    policy = RoutingPolicy(
        settings.labels, {"calendar"}, LiveSettings.of(DOC_CFG).gateway, (), set(settings.models)
    )
    cards = {c.id: c for c in model_list(policy, settings, True, 0).data}
    doc = cards["doc"]
    assert doc.parent is None and doc.root == "storage/merged/doc"
    assert (doc.max_completion_tokens, doc.max_model_len, doc.max_pixels) == (12384, 4096, 16 * 32 * 32)
    assert cards["calendar"].max_completion_tokens is None  # experts answer within the server's limits
    assert settings.for_model("doc").limits.max_completion_tokens == 12384
    assert settings.for_model("calendar") is settings and settings.limits.max_completion_tokens == 512


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A gateway whose config has the further model ``doc``, served by its own (fake) deployment."""
    from ray import serve

    s = Service(DOC_CFG)
    s.doc = FakeModel("merged", "doc")  # type: ignore[attr-defined]
    s.handles["doc"] = FakeHandle(s.doc)  # type: ignore[attr-defined]
    s.gateway.merged["doc"] = s.handles["doc"]  # type: ignore[assignment]
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=s.gateway))
    yield s
    GUARDS.keys = None


def test_a_further_model_answers_on_both_apis_from_its_own_deployment(svc: Service) -> None:
    doc: FakeModel = svc.doc  # type: ignore[attr-defined]
    r = svc.chat(model="doc", max_tokens=12384)
    assert r.status_code == 200, r.text
    assert r.json()["moe"]["adapter"] == "doc" and r.json()["moe"]["mode"] == "merged"
    infer = svc.http.post(
        "/infer", json={"image_b64": base64.b64encode(_png()).decode(), "prompt": "p", "expert": "doc"}
    )
    assert infer.status_code == 200 and infer.json()["adapter"] == "doc", infer.text
    assert [a for _, a in doc.queries] == ["doc", "doc"] and not svc.dynamic.queries
    # a 64x48 image seen within doc's own pixel bounds (4 to 16 tokens), not the server's
    query, _ = doc.queries[-1]
    assert (query.bounds.min_pixels, query.bounds.max_pixels) == (4 * 32 * 32, 16 * 32 * 32)
    assert infer.json()["image"]["tokens"] == 4
    assert {m.id for m in svc.sdk.models.list()} >= {"doc", "calendar"}


def test_a_further_model_is_held_to_its_own_limits(svc: Service) -> None:
    err = _error(svc.chat(model="doc", max_tokens=12385), 400, "max_tokens")
    assert "12384" in err["message"]
    err = _error(svc.chat(model="calendar", max_tokens=513), 400, "max_tokens")  # the server's limit
    assert "512" in err["message"]
    big = _data_url(_png((2000, 2000)))  # within the server's max_image_pixels: doc's max_pixels scales it
    r = svc.chat(model="doc", messages=[_user(image=big)], min_pixels=17 * 32 * 32)
    _error(r, 400, "min_pixels")  # over doc's max_pixels: the request's own bound is refused


def test_the_router_may_name_a_further_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A router label naming a further model (config ``router.labels``): a routed request is answered by
    that model's own deployment."""
    from ray import serve

    data = DOC_CFG.model_dump(mode="json")
    data["router"]["labels"] = {0: "calendar", 1: "doc"}
    s = Service(DeploymentConfig.from_dict(data))
    doc = FakeModel("merged", "doc")
    s.gateway.merged["doc"] = FakeHandle(doc)  # type: ignore[assignment]
    s.dynamic.verdict = Classification("doc", 0.9, {"doc": 0.9, "calendar": 0.1})
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=s.gateway))
    try:
        r = s.chat(model="auto")
        assert r.status_code == 200 and r.json()["moe"]["adapter"] == "doc", r.text
        assert [a for _, a in doc.queries] == ["doc"] and not s.dynamic.queries
    finally:
        GUARDS.keys = None


def test_a_further_model_never_falls_back_to_the_dynamic_deployment(svc: Service) -> None:
    doc: FakeModel = svc.doc  # type: ignore[attr-defined]
    doc.fail = RuntimeError("replica died")
    r = svc.chat(model="doc")
    assert r.status_code == 503, r.text
    assert not svc.dynamic.queries  # the dynamic deployment has no such model: never asked


def test_a_further_model_serves_its_published_checkpoint_with_its_own_settings(
    tmp_path: Path,
) -> None:
    """The merged machinery on a checkpoint of its own (merged/<name>/): its own engine settings, never
    stale (no adapter behind it), a new version picked up without a restart."""
    store = Storage(str(tmp_path / "storage"))
    cfg = DeploymentConfig.from_dict(
        DOC_CFG.model_dump(mode="json")
        | {"merged": {"adapters": [{"name": "calendar"}], "refresh_interval_s": 0.0}}
    )
    made: list[tuple[EngineSettings, FakeEngine]] = []

    def factory(settings: EngineSettings, path: Path | None, name: str, rows: int, queue: int) -> FakeEngine:
        made.append((settings, FakeEngine(path)))
        return made[-1][1]

    async def run() -> None:
        _publish(store, tmp_path, "merged", "doc", "m1")
        m = FullModel(FullModelSettings.of(cfg, "doc"), engine_factory=factory, storage=store)
        settings, engine = made[0]
        assert settings.system_prompt == "" and settings.limits.max_completion_tokens == 12384
        assert settings.limits.max_pixels == 16 * 32 * 32
        assert engine.path is not None and engine.path.joinpath("tag").read_text() == "m1"
        answer = await m.generate(_q("page"), "doc")
        assert (answer.adapter, answer.mode) == ("doc", "merged") and m.status().ready
        with pytest.raises(ModelUnavailable):
            await m.generate(_q("page"), "calendar")
        _publish(store, tmp_path, "merged", "doc", "m2")
        await m.generate(_q("page"), "doc")
        for _ in range(50):  # the refresh runs in the background
            await asyncio.sleep(0.02)
            if len(made) == 2:
                break
        assert made[1][1].path is not None and made[1][1].path.joinpath("tag").read_text() == "m2"

    asyncio.run(run())


def test_a_further_model_with_nothing_published_is_unavailable(tmp_path: Path) -> None:
    m = FullModel(
        FullModelSettings.of(DOC_CFG, "doc"),
        engine_factory=lambda *a: FakeEngine(),
        storage=Storage(str(tmp_path / "storage")),
    )
    with pytest.raises(ModelUnavailable, match="no published model"):
        asyncio.run(m.generate(_q("page"), "doc"))


def test_config_refuses_a_model_named_as_an_adapter_or_twice() -> None:
    data: dict[str, Any] = CFG.model_dump(mode="json")
    for models in ([{"name": "calendar"}], [{"name": "m"}, {"name": "m"}], [{"name": "router"}]):
        with pytest.raises(Exception, match="twice"):
            DeploymentConfig.from_dict(data | {"models": models})
    with pytest.raises(Exception, match=r"models\.m\.limits"):
        DeploymentConfig.from_dict(data | {"models": [{"name": "m", "limits": {"min_pixels": 10**9}}]})
    with pytest.raises(Exception, match="not fields of limits"):
        DeploymentConfig.from_dict(data | {"models": [{"name": "m", "limits": {"max_tokens": 1}}]})
