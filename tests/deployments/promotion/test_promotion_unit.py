"""The promotion controller, a slot and the gateway's promoted routing, on a fake engine, fake handles
and a real storage root (the policy's tables are in test_promotion_policy.py; the real thing end to end
in test_promotion_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from deployments.gateway.errors import ServiceUnavailable
from deployments.gateway.service import Gateway
from deployments.promotion.autoscaling import (
    SLOT_HELD,
    SLOT_POLICY,
    UNREPORTED_GRACE_INTERVALS,
    keep_assigned_slots,
)
from deployments.promotion.controller import PromotionController
from deployments.promotion.policy import ASSIGNMENTS, Assignment, Assignments, read_assignments
from deployments.promotion.slots import MergedSlot
from deployments.settings import GatewaySettings, PromotionSettings, SlotSettings
from moe_core.config import DeploymentConfig, LiveSettings, StorageConfig
from moe_core.engine import Classification
from moe_core.storage.errors import StorageUnavailable
from moe_core.storage.store import Storage
from tests.deployments.models.test_deployments_unit import (
    FakeEngine,
    FakeHandle,
    _dynamic,
    _publish,
    _q,
    _req,
)

CFG = DeploymentConfig.from_dict(
    {
        "router": {"adapter": "router", "labels": {0: "calendar", 1: "login-window"}},
        "merged": {"adapters": [{"name": "calendar"}], "refresh_interval_s": 0.0},
        "dynamic": {"adapters": ["login-window", "desktop"], "refresh_interval_s": 0.0},
        "promotion": {
            "enabled": True,
            "slots": 1,
            "promote_rps": 1.0,
            "promote_window_s": 5,
            "demote_rps": 0.2,
            "demote_window_s": 10,
            "cooldown_s": 20,
            "drain_s": 0.0,
        },
    }
)
LIVE = LiveSettings.of(CFG)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _store(tmp_path: Path) -> Storage:
    st = Storage(str(tmp_path / "storage"))
    for kind, name in (("expert", "calendar"), ("expert", "login-window"), ("expert", "desktop")):
        _publish(st, tmp_path, kind, name, "v1")
    return st


def _slot(st: Storage) -> MergedSlot:
    def factory(settings: Any, path: Path | None, name: str, rows: int, queue: int) -> FakeEngine:
        return FakeEngine(path)

    return MergedSlot(SlotSettings.of(CFG, 0), engine_factory=factory, storage=st)


def _controller(st: Storage, slot: MergedSlot, clock: Clock, merges: list[str]) -> PromotionController:
    async def merge(config_json: str, adapter: str) -> None:
        """What the merge task does, as far as the controller can see: a merged version is published."""
        merges.append(adapter)
        d = st.root + f"/../merged-{adapter}-{len(merges)}"
        Path(d).mkdir()
        (Path(d) / "tag").write_text(f"merged{len(merges)}")
        source = st.current_version("expert", adapter)
        (Path(d) / "merge_metadata.json").write_text(json.dumps({"source_version": source}))
        st.publish("merged", adapter, Path(d))

    c = PromotionController(
        PromotionSettings.of(CFG), [FakeHandle(slot)], merge=merge, storage=st, clock=clock
    )
    c.reconfigure(LIVE.promotion.model_dump())
    return c


async def _traffic(c: PromotionController, clock: Clock, counts: dict[str, int], seconds: int) -> None:
    """``seconds`` one-second ticks, each with one report of ``counts``; switches run to their end."""
    for _ in range(seconds):
        clock.t += 1.0
        await c.report(counts)
        await c.tick()
        for task in list(c._busy.values()):
            await task


def test_a_hot_adapter_is_merged_loaded_and_routed_then_demoted_when_cold(tmp_path: Path) -> None:
    st, clock, merges = _store(tmp_path), Clock(), []

    async def scenario() -> None:
        slot = _slot(st)
        c = _controller(st, slot, clock, merges)
        await _traffic(c, clock, {"login-window": 3, "desktop": 0}, 3)
        assert read_assignments(st, 1).slots == (None,)  # not before the promote window
        await _traffic(c, clock, {"login-window": 3}, 4)
        a = read_assignments(st, 1).slots[0]
        assert a is not None and (a.adapter, a.state) == ("login-window", "ready"), a
        assert "login-window" in a.reason and "req/s" in a.reason
        assert merges == ["login-window"] and slot.adapter == "login-window"
        sw = (await c.status())["switches"]["login-window"]
        assert sw["merged"] and sw["merge_s"] is not None and sw["load_s"] is not None
        # traffic stops: demoted once the demote window has passed (and the cooldown)
        await _traffic(c, clock, {}, 9)
        assert read_assignments(st, 1).slots[0] is not None
        await _traffic(c, clock, {}, 15)
        assert read_assignments(st, 1).slots == (None,)
        await asyncio.sleep(0.05)
        assert (await slot.status()).adapter is None  # the slot let its model go
        # hot again: not within the cooldown of its demotion; then promoted with no second merge (the
        # published merged version still comes from the current LoRA version)
        await _traffic(c, clock, {"login-window": 3}, 8)
        assert read_assignments(st, 1).slots == (None,)
        await _traffic(c, clock, {"login-window": 3}, 14)
        assert read_assignments(st, 1).routed() == {"login-window": 0} and merges == ["login-window"]

    asyncio.run(scenario())


def test_pinned_and_denied_adapters_never_move_and_a_restart_resumes(tmp_path: Path) -> None:
    st, clock, merges = _store(tmp_path), Clock(), []

    async def scenario() -> None:
        slot = _slot(st)
        c = _controller(st, slot, clock, merges)
        c.reconfigure(LIVE.promotion.model_dump() | {"deny": ["desktop"]})
        await _traffic(c, clock, {"calendar": 9, "desktop": 9}, 8)
        assert read_assignments(st, 1).slots == (None,) and merges == []
        c.reconfigure(LIVE.promotion.model_dump())
        await _traffic(c, clock, {"desktop": 9}, 6)
        assert read_assignments(st, 1).routed() == {"desktop": 0}
        # a new controller (a restart) starts from the stored assignments, mid-promotion ones included
        again = _controller(st, slot, clock, merges)
        assert again.assignments.routed() == {"desktop": 0}
        assert again.last_switch["desktop"] == read_assignments(st, 1).slots[0].since  # type: ignore[union-attr]
        await _traffic(again, clock, {"desktop": 9}, 3)
        assert read_assignments(st, 1).routed() == {"desktop": 0} and merges == ["desktop"]

    asyncio.run(scenario())


def test_a_promotion_cut_off_while_loading_is_carried_on(tmp_path: Path) -> None:
    st, clock, merges = _store(tmp_path), Clock(), []

    async def scenario() -> None:
        slot = _slot(st)
        c = _controller(st, slot, clock, merges)
        await _traffic(c, clock, {"desktop": 9}, 6)
        state, rev = st.read_state(ASSIGNMENTS)
        state["slots"][0]["state"] = "loading"  # as if the controller died before "ready"
        st.write_state(ASSIGNMENTS, state | {"revision": rev + 1}, expect=rev)
        again = _controller(st, slot, clock, merges)
        await again.status()  # starts it: the cut-off promotion is carried on
        for task in list(again._busy.values()):
            await task
        assert read_assignments(st, 1).routed() == {"desktop": 0}

    asyncio.run(scenario())


def test_a_controller_started_during_a_storage_outage_resumes_when_it_is_back(tmp_path: Path) -> None:
    """Its replica is built while the storage cannot be read (a transient S3 error): the constructor does
    not fail (Serve would restart the replica over and over); nothing is decided until the stored
    assignments can be read, then a promotion cut off while loading is carried on."""
    st, clock, merges = _store(tmp_path), Clock(), []
    real, down = st.read_state, [True]

    def flaky(name: str) -> tuple[dict[str, Any], int]:
        if down[0]:
            raise StorageUnavailable("storage test cannot be read: an outage")
        return real(name)

    async def scenario() -> None:
        slot = _slot(st)
        c = _controller(st, slot, clock, merges)
        await _traffic(c, clock, {"desktop": 9}, 6)
        state, rev = st.read_state(ASSIGNMENTS)
        state["slots"][0]["state"] = "loading"  # as if the controller died before "ready"
        st.write_state(ASSIGNMENTS, state | {"revision": rev + 1}, expect=rev)
        assert c._loop is not None
        c._loop.cancel()
        st.read_state = flaky  # type: ignore[method-assign]
        again = _controller(st, slot, clock, merges)  # the outage: built all the same
        await again.status()
        assert again.assignments.revision == 0 and await again.tick() == [] and not again._busy
        down[0] = False
        await again.tick()  # storage is back: resumed, the cut-off promotion carried on
        for task in list(again._busy.values()):
            await task
        assert again.assignments.revision > rev and read_assignments(st, 1).routed() == {"desktop": 0}

    asyncio.run(scenario())


def test_the_gateway_sends_promoted_adapters_to_their_slot_and_falls_back_once(tmp_path: Path) -> None:
    st = _store(tmp_path)
    _publish(st, tmp_path, "merged", "login-window", "m1")

    async def scenario() -> None:
        slot = _slot(st)
        d, _ = _dynamic(st)
        reports: list[dict[str, int]] = []

        class Controller:
            async def report(self, counts: dict[str, int]) -> None:
                reports.append(counts)

        g = Gateway(
            GatewaySettings.of(CFG).model_copy(update={"storage": StorageConfig(url=st.url)}),
            FakeHandle(d),
            {"calendar": FakeHandle(fail=True)},
            [FakeHandle(slot)],
            FakeHandle(Controller()),
        )
        g.reconfigure(LIVE.gateway.model_dump())
        r = await g._infer(_req(expert="login-window"))
        assert (r.mode, r.fallback) == ("dynamic", False)
        state = {
            "revision": 1,
            "slots": [
                {"slot": 0, "adapter": "login-window", "state": "ready", "since": 1.0, "reason": "test"}
            ],
        }
        st.write_state(ASSIGNMENTS, state, expect=0)
        await slot.status()
        await asyncio.sleep(1.5)  # one report interval: the gateway reads the assignments
        assert g.promoted == {"login-window": 0} and g.policy.target("login-window", None) == "merged"
        r = await g._infer(_req(expert="login-window"))
        assert (r.mode, r.fallback, r.adapter) == ("merged", False, "login-window"), r
        assert any(rep.get("login-window") for rep in reports)
        # the slot moves on before the gateway has read it: that request is answered by dynamic, once
        st.write_state(ASSIGNMENTS, {"revision": 2, "slots": [None]}, expect=1)
        await slot.status()
        await asyncio.sleep(0.05)
        assert g.promoted == {"login-window": 0}
        r = await g._infer(_req(expert="login-window"))
        assert (r.mode, r.fallback) == ("dynamic", True)
        await asyncio.sleep(1.2)
        assert g.promoted == {} and g.policy.target("login-window", None) == "dynamic"

    asyncio.run(scenario())


def test_the_merge_task_gets_a_valid_config_from_the_apps_static_args() -> None:
    """The app's args hold placeholders for live fields (no adapter lists): the merge task's config must
    still validate (it did not, and every promotion's merge failed on the cluster)."""
    static, live = DeploymentConfig.from_static(
        DeploymentConfig.from_file("config/deployment.yaml").static_dump()
    )
    assert live is None
    merge_cfg = DeploymentConfig.model_validate_json(PromotionSettings.of(static).config_json)
    assert merge_cfg.base_model == static.base_model and merge_cfg.merge == static.merge
    assert merge_cfg.storage == static.storage


def test_the_controllers_timeouts_come_from_the_config() -> None:
    default = PromotionSettings.of(DeploymentConfig())
    assert (default.load_timeout_s, default.merge_timeout_s, default.write_retry_s) == (600.0, 1800.0, 300.0)
    set_ = PromotionSettings.of(
        DeploymentConfig.from_dict(
            {"promotion": {"load_timeout_s": 90, "merge_timeout_s": 120, "write_retry_s": 30}}
        )
    )
    assert (set_.load_timeout_s, set_.merge_timeout_s, set_.write_retry_s) == (90.0, 120.0, 30.0)


def test_a_new_adapter_version_while_promoted_is_merged_again(tmp_path: Path) -> None:
    st, clock, merges = _store(tmp_path), Clock(), []

    async def scenario() -> None:
        slot = _slot(st)
        c = _controller(st, slot, clock, merges)
        await _traffic(c, clock, {"desktop": 9}, 6)
        assert read_assignments(st, 1).routed() == {"desktop": 0} and merges == ["desktop"]
        _publish(st, tmp_path, "expert", "desktop", "v2")  # a retrained adapter is deployed
        await _traffic(c, clock, {"desktop": 9}, 2)
        assert merges == ["desktop", "desktop"] and read_assignments(st, 1).routed() == {"desktop": 0}
        assert slot.source["source_version"] == st.current_version("expert", "desktop")

    asyncio.run(scenario())


def test_switches_survive_storage_errors_and_a_merge_that_hangs_is_given_up(tmp_path: Path) -> None:
    st, clock, merges = _store(tmp_path), Clock(), []

    async def scenario() -> None:
        slot = _slot(st)
        c = _controller(st, slot, clock, merges)
        real = st.write_state
        failures = [3]

        def flaky(*args: Any, **kwargs: Any) -> int:
            if failures[0]:
                failures[0] -= 1
                raise StorageUnavailable("storage test cannot be read: an outage")
            return real(*args, **kwargs)

        st.write_state = flaky  # type: ignore[method-assign]
        await _traffic(c, clock, {"desktop": 9}, 6)  # three writes fail, then go through
        assert read_assignments(st, 1).routed() == {"desktop": 0} and failures == [0]

        # a merge that never finishes is cancelled after merge_timeout_s, and the slot freed
        async def hang(config_json: str, adapter: str) -> None:
            await asyncio.sleep(3600)

        assert c._loop is not None
        c._loop.cancel()  # one controller at a time, as Serve runs it
        other = _controller(st, slot, clock, merges)
        other.merge = hang
        other.settings = other.settings.model_copy(update={"merge_timeout_s": 0.2})
        other.reconfigure(LIVE.promotion.model_dump() | {"enabled": False})
        await _traffic(other, clock, {}, 3)  # demotes desktop (promotion disabled)
        assert read_assignments(st, 1).slots == (None,)
        other.reconfigure(LIVE.promotion.model_dump() | {"cooldown_s": 0})
        await _traffic(other, clock, {"login-window": 9}, 6)
        assert read_assignments(st, 1).slots == (None,)
        assert any(d["kind"] == "promote" and d["adapter"] == "login-window" for d in other.decisions)

    asyncio.run(scenario())


def test_a_freed_slot_releases_its_merged_version_in_the_node_cache(tmp_path: Path) -> None:
    """On a remote root (memory://, through the node cache, bounded at one byte) a slot that is freed lets
    the node cache evict the merged version it served; while it serves it, the version stays."""
    st = Storage.from_config(
        StorageConfig(
            url=f"memory://slot-{uuid.uuid4().hex}", cache_dir=str(tmp_path / "node"), cache_max_gb=1e-9
        )
    )
    _publish(st, tmp_path, "expert", "login-window", "v1")
    v = _publish(st, tmp_path, "merged", "login-window", "m1")
    versions = tmp_path / "node" / "versions"

    async def scenario() -> None:
        slot = _slot(st)
        slot._install(await asyncio.to_thread(slot._open, "login-window", v))
        st.node_cache.evict()
        assert len(list(versions.iterdir())) == 1  # served: kept over the bound
        slot._release()
        st.node_cache.evict()
        assert not any(versions.iterdir())

    asyncio.run(scenario())


def test_routed_answers_count_and_promoted_adapters_fall_back_even_when_pinned_ones_may_not(
    tmp_path: Path,
) -> None:
    st = _store(tmp_path)
    _publish(st, tmp_path, "router", "router", "v1")
    # the assignment the gateway's own report loop reads (else it may unroute the slot mid-test)
    ready = Assignment(0, "login-window", "ready", time.time(), "test")
    st.write_state(ASSIGNMENTS, Assignments(slots=(ready,), revision=0).to_json(), expect=0)

    async def scenario() -> None:
        d, engine = _dynamic(st)
        engine.verdict = Classification("login-window", 0.9, {"login-window": 0.9, "calendar": 0.1})
        counted: list[dict[str, int]] = []

        class Controller:
            async def report(self, counts: dict[str, int]) -> None:
                counted.append(counts)

        dead_slot = FakeHandle(fail=True)
        g = Gateway(
            GatewaySettings.of(CFG).model_copy(
                update={"storage": StorageConfig(url=st.url), "report_interval_s": 0.2}
            ),
            FakeHandle(d),
            {"calendar": FakeHandle(fail=True)},
            [dead_slot],
            FakeHandle(Controller()),
        )
        g.reconfigure(LIVE.gateway.model_dump() | {"fallback_to_dynamic": False})
        r = await g._infer(_req())  # routed to login-window: the routing hop answers it in place
        assert (r.routed_via, r.adapter, r.mode) == ("router", "login-window", "dynamic")
        g._route_promoted({"login-window": 0})
        r = await g._infer(_req(expert="login-window"))  # the slot fails: dynamic answers it anyway
        assert (r.mode, r.fallback) == ("dynamic", True) and dead_slot.calls == 1
        with pytest.raises(ServiceUnavailable):  # a pinned one obeys fallback_to_dynamic: false
            await g._infer(_req(expert="calendar"))
        await asyncio.sleep(0.5)
        total: dict[str, int] = {}
        for c in counted:
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        assert total.get("login-window") == 2 and total.get("calendar") == 1, total

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- slots and autoscaling
def _assign(st: Storage, adapter: str | None, state: str = "ready") -> None:
    _, rev = st.read_state(ASSIGNMENTS)
    slot = None if adapter is None else Assignment(0, adapter, state, time.time(), "test")  # type: ignore[arg-type]
    st.write_state(ASSIGNMENTS, Assignments(slots=(slot,), revision=rev + 1).to_json(), expect=rev)


async def _looked(slot: MergedSlot) -> None:
    """The slot's watch has read the assignments anew and loaded or let go what they say (twice: a look
    its poll began before the test wrote them may still be under way the first time)."""
    for _ in range(2):
        await slot.status()
        if slot._task is not None:
            await slot._task


def test_a_slot_replica_loads_its_assignment_before_it_takes_requests_and_reports_it(tmp_path: Path) -> None:
    """A replica Serve starts for an assigned slot (scaled up from zero, restarted) serves its adapter from
    its first request: it loaded it in its constructor, which Serve waits for before routing to it."""
    st = _store(tmp_path)
    version = _publish(st, tmp_path, "merged", "login-window", "m1")
    _assign(st, "login-window")

    async def scenario() -> None:
        slot = _slot(st)
        assert (slot.adapter, slot.engine is not None) == ("login-window", True)
        answer = await slot.generate(_q("p"), "login-window")  # the first request: no ModelUnavailable
        assert (answer.adapter, answer.mode, answer.version) == ("login-window", "merged", version)
        assert await slot.record_autoscaling_stats() == {SLOT_HELD: 1.0}
        _assign(st, None)  # freed: the watch lets the model go and the replica reports the slot free
        await _looked(slot)
        assert (slot.adapter, await slot.record_autoscaling_stats()) == (None, {SLOT_HELD: 0.0})
        _assign(st, "login-window", "merging")  # assigned, still merging: nothing to load, but held
        await _looked(slot)
        assert (slot.adapter, await slot.record_autoscaling_stats()) == (None, {SLOT_HELD: 1.0})
        assert _slot(st).adapter is None and await _slot(st).record_autoscaling_stats() == {SLOT_HELD: 1.0}
        _assign(st, None)
        assert await _slot(st).record_autoscaling_stats() == {SLOT_HELD: 0.0}

    asyncio.run(scenario())


def test_a_slot_replica_started_in_a_storage_outage_counts_as_held_and_loads_when_it_is_back(
    tmp_path: Path,
) -> None:
    st = _store(tmp_path)
    _publish(st, tmp_path, "merged", "login-window", "m1")
    _assign(st, "login-window")
    real, down = st.read_state, [True]

    def flaky(name: str) -> tuple[dict[str, Any], int]:
        if down[0]:
            raise StorageUnavailable("storage test cannot be read: an outage")
        return real(name)

    async def scenario() -> None:
        st.read_state = flaky  # type: ignore[method-assign]
        slot = _slot(st)  # built all the same (Serve would restart a failing constructor over and over)
        assert slot.adapter is None and await slot.record_autoscaling_stats() == {SLOT_HELD: 1.0}
        down[0] = False
        await _looked(slot)
        assert slot.adapter == "login-window" and await slot.record_autoscaling_stats() == {SLOT_HELD: 1.0}

    asyncio.run(scenario())


def _ctx(held: dict[str, float] | None, *, running: int = 1, requests: float = 0.0, **kw: Any) -> Any:
    """What Serve's controller gives a policy: replicas ``r0``..., their slot_held metric (None: none
    reported), ``requests`` ongoing over the look-back window."""
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(
        min_replicas=0, max_replicas=4, target_ongoing_requests=8, downscale_delay_s=0, upscale_delay_s=0
    )
    replicas = [f"r{i}" for i in range(running)]
    return AutoscalingContext(
        deployment_id=None,  # type: ignore[arg-type]
        deployment_name="MergedSlot-0",
        app_name="moe",
        current_num_replicas=running,
        target_num_replicas=kw.get("target", running),
        running_replicas=replicas,  # type: ignore[arg-type]
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics={} if held is None else {SLOT_HELD: held},  # type: ignore[dict-item]
        raw_metrics={},
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=4,
        policy_state=kw.get("state", {}),
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=kw.get("now", 1000.0),
        config=config,
    )


def test_the_slot_policy_keeps_one_replica_while_the_slot_is_assigned_and_is_serves_otherwise() -> None:
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy as serves

    idle_assigned = _ctx({"r0": 1.0})
    assert serves(idle_assigned)[0] == 0  # what Serve alone decides: an idle-looking slot goes to zero
    assert keep_assigned_slots(idle_assigned)[0] == 1
    assert keep_assigned_slots(_ctx({"r0": 0.3}))[0] == 1  # assigned within the look-back window
    assert keep_assigned_slots(_ctx({"r0": 0.0}))[0] == 0  # free: scaled to zero as before
    assert keep_assigned_slots(_ctx({"r0": 0.0, "r1": 1.0}, running=2))[0] == 1
    assert keep_assigned_slots(_ctx({}, running=0, target=0))[0] == 0  # at zero: a request wakes it
    # above the floor it is Serve's policy: 24 ongoing requests at 8 per replica
    assert keep_assigned_slots(_ctx({"r0": 1.0}, requests=24.0))[0] == serves(_ctx({}, requests=24.0))[0] == 3


def test_a_replica_that_has_not_reported_yet_counts_as_assigned_for_a_few_metric_intervals() -> None:
    desired, state = keep_assigned_slots(_ctx(None, now=1000.0))  # started just now, no report yet
    assert desired == 1
    grace = UNREPORTED_GRACE_INTERVALS * 10.0  # Serve's default metrics_interval_s
    assert keep_assigned_slots(_ctx(None, now=1000.0 + grace - 1, state=state))[0] == 1
    desired, state = keep_assigned_slots(_ctx(None, now=1000.0 + grace + 1, state=state))
    assert desired == 0  # a replica that never reports (no custom metrics) does not pin the slot forever
    assert list(keep_assigned_slots(_ctx(None, running=0, target=0, state=state))[1]["slot_first_seen"]) == []


def test_serve_applies_the_slot_policy_with_its_delays_and_loads_it_by_value_without_this_project() -> None:
    """The policy as Serve's controller runs it: wrapped with the deployment's delays and factors (here
    none), and unpickled from the bytes the app's build wrote, in a process that cannot import this
    project (Serve's controller need not have it); and the app binds it to every slot."""
    import subprocess
    import sys

    from ray.serve._private.autoscaling_state import _apply_autoscaling_config
    from ray.serve.config import AutoscalingPolicy

    from deployments.app import build_app, slot_name

    wrapped = _apply_autoscaling_config(keep_assigned_slots)
    assert wrapped(_ctx({"r0": 1.0}))[0] == 1 and wrapped(_ctx({"r0": 0.0}))[0] == 0
    pickled = AutoscalingPolicy(policy_function=SLOT_POLICY).get_serialized_policy_def()
    probe = (
        "import sys\n"
        "for name in ('deployments', 'moe_core', 'moe_demo', 'merge_jobs'):\n"
        "    sys.modules[name] = None  # importing it raises\n"
        "from ray import cloudpickle\n"
        "from ray.serve.config import AutoscalingConfig, AutoscalingContext\n"
        "policy = cloudpickle.loads(sys.stdin.buffer.read())\n"
        "ctx = AutoscalingContext(None, 'MergedSlot-0', 'moe', 1, 1, ['r0'], 0.0, 0.0,\n"
        "    {'slot_held': {'r0': 1.0}}, {}, 0, 4, {}, None, None, 1000.0, AutoscalingConfig(min_replicas=0))\n"
        "print(policy.__name__, policy(ctx)[0])\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], input=pickled, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout.decode().split() == ["keep_assigned_slots", "1"]  # held: one replica kept

    gateway: Any = build_app({"config": "config/deployment.yaml"})._bound_deployment
    slots = gateway.init_args[3]
    assert [s._bound_deployment.name for s in slots] == [slot_name(0)]
    policy = slots[0]._bound_deployment._deployment_config.autoscaling_config.policy
    assert policy.policy_function == SLOT_POLICY
