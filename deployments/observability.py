"""Metrics, request ids and structured logs, through Ray Serve's own mechanisms.

Metrics are ``ray.serve.metrics`` objects, exported on each Ray node's metrics port beside Serve's
built-in ``ray_serve_*`` metrics (which count HTTP requests per route and status; these add what
Serve cannot know: the adapter, the path, routing and the adapter cache). Ray prefixes every name
with ``ray_`` and gives counters ``_total``, so ``moe_requests`` is scraped as
``ray_moe_requests_total``; Serve adds the ``application``, ``deployment`` and ``replica`` labels.

Request ids are Serve's: the proxy takes ``X-Request-Id`` from the client (or makes one), returns it
as a response header and carries it through every handle call. Log lines about a request go to the
``ray.serve`` logger tree, whose JSON records carry ``request_id`` themselves; the gateway writes one
access-log line per request with the adapter, path, routing, status, tokens and latency split.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, cast

from ray.serve.metrics import Counter, Gauge, Histogram

from moe_core.answers import Timings

__all__ = [
    "METRIC_NAMES",
    "DynamicMetrics",
    "ForwardMetrics",
    "GatewayMetrics",
    "MergedMetrics",
    "PromotionMetrics",
    "ReplicaErrorLog",
    "RequestTrace",
    "current_request_id",
    "quiet_expected_errors",
    "request_logger",
]

#: Seconds, from 1 ms to 60 s: latency, queue time, time per output token, adapter loads.
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
COUNT_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
PIXEL_BUCKETS = [float(2**k) for k in (14, 16, 18, 19, 20, 21, 22, 23)]

#: Every metric this module defines, as it is scraped (for the dashboard's test).
METRIC_NAMES: dict[str, str] = {}


def request_logger(name: str) -> logging.Logger:
    """A logger under ``ray.serve``: in a replica its JSON records carry the request id and deployment."""
    return logging.getLogger(f"ray.serve.moe.{name}")


def current_request_id() -> str:
    """The id Serve gave this request (the client's ``X-Request-Id`` when it sent one); '' outside one."""
    try:
        from ray.serve.context import _get_serve_request_context  # Serve's own; no public getter yet

        return str(_get_serve_request_context().request_id or "")
    except Exception:  # outside a replica (unit tests)
        return ""


@dataclass
class RequestTrace:
    """What the gateway learns about one request on its way, for its metrics and its access-log line."""

    request_id: str
    api: str = "infer"
    adapter: str = "none"  # the adapter that answered or was asked for; "base" for the bare model
    mode: str = "none"  # merged, dynamic or base; none when nothing generated
    routed_via: str = "none"
    confidence: float | None = None
    fallback: str | None = None  # why merged failed over to dynamic
    pixels: int = 0
    image_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route_s: float = 0.0  # time in the routing hop (classify, and the answer when given in place)
    answer_s: float = 0.0  # time in the answering hop(s)
    replica_s: float = 0.0  # of which in the answering replica's method (reported by it)
    engine_s: float = 0.0  # of which in its engine, submission to last token (reported by it)

    def answered(self, adapter: str | None, mode: str) -> None:
        """Record who answered: the adapter (``base`` for the bare model) and the deployment's mode."""
        self.adapter = adapter or "base"
        self.mode = mode if adapter else "base"

    def server_timing(self) -> str:
        """W3C Server-Timing of the hops so far (ms): the gateway's whole time, the calls to model
        replicas as the gateway saw them, the answering replica's method, and its engine."""
        gateway = (time.perf_counter() - self.started) * 1e3
        hops = (self.route_s + self.answer_s) * 1e3
        return (
            f"gateway;dur={gateway:.2f}, hops;dur={hops:.2f}, replica;dur={self.replica_s * 1e3:.2f}, "
            f"engine;dur={self.engine_s * 1e3:.2f}"
        )

    started: float = field(default_factory=time.perf_counter)


def _counter(name: str, description: str, tags: tuple[str, ...]) -> Counter:
    METRIC_NAMES[name] = f"ray_{name}_total"
    return Counter(name, description=description, tag_keys=cast(Any, tags))  # Ray annotates tuple[str]


def _histogram(name: str, description: str, buckets: list[float], tags: tuple[str, ...]) -> Histogram:
    METRIC_NAMES[name] = f"ray_{name}_bucket"
    return Histogram(name, description=description, boundaries=buckets, tag_keys=cast(Any, tags))


class KeptGauge:
    """A gauge whose last values are set again every ``interval`` seconds by a daemon thread: Ray drops
    a gauge value that is not set again within two metrics report intervals, so a value set once (the
    merged version a replica serves, an idle queue's depth) would otherwise vanish from the scrape."""

    _lock = threading.Lock()
    _kept: ClassVar[dict[tuple[int, frozenset[tuple[str, str]]], tuple[Gauge, float, dict[str, str]]]] = {}
    _thread: ClassVar[threading.Thread | None] = None

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        tags = dict(tags or {})
        with self._lock:
            KeptGauge._kept[(id(self.gauge), frozenset(tags.items()))] = (self.gauge, value, tags)
            if KeptGauge._thread is None:
                KeptGauge._thread = threading.Thread(
                    target=KeptGauge._refresh, name="moe-gauges", daemon=True
                )
                KeptGauge._thread.start()
        self.gauge.set(value, tags=tags)

    @staticmethod
    def _refresh() -> None:
        ms = os.environ.get("RAY_metrics_report_interval_ms", "10000")  # noqa: SIM112 (Ray spells it so)
        interval = max(0.5, float(ms) / 2000)
        while True:
            time.sleep(interval)
            with KeptGauge._lock:
                kept = list(KeptGauge._kept.values())
            for gauge, value, tags in kept:
                gauge.set(value, tags=tags)


def _gauge(name: str, description: str, tags: tuple[str, ...]) -> KeptGauge:
    METRIC_NAMES[name] = f"ray_{name}"
    return KeptGauge(Gauge(name, description=description, tag_keys=cast(Any, tags)))


class GatewayMetrics:
    """Per request: by adapter, mode (merged/dynamic/base), routed_via, status class and api."""

    log = request_logger("gateway")

    def record(self, t: RequestTrace, status: int) -> None:
        """Count one finished request and write its access-log line."""
        latency = time.perf_counter() - t.started
        tags = {
            "adapter": t.adapter,
            "mode": t.mode,
            "routed_via": t.routed_via,
            "status": f"{status // 100}xx",
            "api": t.api,
        }
        self.requests.inc(tags=tags)
        self.latency.observe(latency, tags=tags)
        if t.pixels:
            self.image_pixels.observe(t.pixels, tags={"api": t.api})
        if t.completion_tokens:
            tokens = {"adapter": t.adapter, "mode": t.mode}
            self.prompt_tokens.inc(t.prompt_tokens, tags=tokens)
            self.generated_tokens.inc(t.completion_tokens, tags=tokens)
        fields = asdict(t) | {"status": status, "latency_s": round(latency, 6)}
        del fields["started"]
        self.log.info(
            "request %s %s adapter=%s mode=%s via=%s status=%d %.1f ms",
            t.request_id,
            t.api,
            t.adapter,
            t.mode,
            t.routed_via,
            status,
            1000 * latency,
            extra={"ray_serve_extra_fields": {"moe": fields}},
        )

    def routed(self, label: str, confidence: float, outcome: str, below: bool) -> None:
        self.routing.inc(tags={"label": label, "outcome": outcome})
        self.confidence.observe(confidence, tags={"label": label})
        if below:
            self.below_threshold.inc(tags={"outcome": outcome})

    def __init__(self) -> None:
        request_tags = ("adapter", "mode", "routed_via", "status", "api")
        self.requests = _counter(
            "moe_requests", "Requests answered, by adapter, path and status.", request_tags
        )
        self.latency = _histogram(
            "moe_request_latency_seconds", "End-to-end latency at the gateway.", LATENCY_BUCKETS, request_tags
        )
        self.fallbacks = _counter(
            "moe_fallbacks", "Merged requests answered by the dynamic deployment.", ("adapter", "reason")
        )
        self.prompt_tokens = _counter("moe_prompt_tokens", "Prompt tokens read.", ("adapter", "mode"))
        self.generated_tokens = _counter("moe_generated_tokens", "Tokens generated.", ("adapter", "mode"))
        self.image_pixels = _histogram(
            "moe_image_pixels", "Pixels per request's image.", PIXEL_BUCKETS, ("api",)
        )
        self.routing = _counter(
            "moe_routing_decisions",
            "Routing adapter verdicts, by chosen label and outcome.",
            ("label", "outcome"),
        )
        self.confidence = _histogram(
            "moe_routing_confidence", "Routing confidence.", CONFIDENCE_BUCKETS, ("label",)
        )
        self.below_threshold = _counter(
            "moe_routing_below_threshold", "Routed requests below the confidence threshold.", ("outcome",)
        )


class ForwardMetrics:
    """Per request, as the scheduler measured it: queue time, time to first token, time per output
    token and tokens in and out, by adapter and path; the engine's queue and running rows."""

    def __init__(self) -> None:
        tags = ("adapter", "mode")
        self.queue_time = _histogram(
            "moe_queue_seconds", "From arrival at the replica to its prefill.", LATENCY_BUCKETS, tags
        )
        self.ttft = _histogram(
            "moe_time_to_first_token_seconds",
            "From arrival at the replica to the first token.",
            LATENCY_BUCKETS,
            tags,
        )
        self.tpot = _histogram(
            "moe_time_per_output_token_seconds",
            "Decode time per output token after the first.",
            LATENCY_BUCKETS,
            tags,
        )
        self.queue_depth = _gauge("moe_queue_depth", "Requests waiting to join the running batch.", ())
        self.in_flight = _gauge("moe_rows_in_flight", "Requests decoding in the running batch.", ())
        self.kv_gauges = {
            "kv_pages_total": _gauge("moe_kv_pages_total", "Pages of the engine's KV cache pool.", ()),
            "kv_pages_used": _gauge("moe_kv_pages_used", "KV cache pages held by running requests.", ()),
            "kv_pages_cached": _gauge(
                "moe_kv_pages_cached", "KV cache pages registered for prefix reuse (held or idle).", ()
            ),
        }
        self.kv_counters = {
            "preemptions": _counter(
                "moe_preemptions", "Running requests preempted because the KV cache was full.", ()
            ),
            "prefix_hit_tokens": _counter(
                "moe_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache.", ()
            ),
            "prompt_tokens_computed": _counter(
                "moe_prompt_tokens_computed", "Prompt tokens the model read (not from the prefix cache).", ()
            ),
        }
        # constrained decoding: (counter, unit of the engine's integer stat)
        mask_seconds = _counter(
            "moe_grammar_mask_seconds", "Time spent computing and applying token masks.", ()
        )
        self.grammar_counters = {
            "constrained_rows": (
                _counter("moe_constrained_rows", "Requests decoded under a grammar.", ()),
                1.0,
            ),
            "grammar_compiles": (
                _counter("moe_grammar_compiles", "Grammars compiled (cache misses).", ()),
                1.0,
            ),
            "grammar_cache_hits": (
                _counter("moe_grammar_cache_hits", "Grammars taken from the compiled-grammar cache.", ()),
                1.0,
            ),
            "grammar_compile_us": (
                _counter("moe_grammar_compile_seconds", "Time spent compiling grammars.", ()),
                1e-6,
            ),
            "grammar_mask_us": (mask_seconds, 1e-6),  # applying masks, on the step's path
            "grammar_fill_us": (mask_seconds, 1e-6),  # computing them, on the grammar thread
            "grammar_masked_tokens": (
                _counter(
                    "moe_grammar_masked_tokens",
                    "Tokens picked under a grammar mask (mask seconds / masked tokens = mask time per token).",
                    (),
                ),
                1.0,
            ),
        }
        self._seen: dict[str, int] = {}
        self.rejected = _counter("moe_queue_full", "Requests refused because the queue was full.", ())
        self.log = request_logger("forward")

    def finished(
        self,
        mode: str,
        adapter: str,
        request_id: str,
        timings: Timings,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        tags = {"adapter": adapter, "mode": mode}
        self.queue_time.observe(timings.queued_s, tags=tags)
        self.ttft.observe(timings.ttft_s, tags=tags)
        if completion_tokens > 1:
            self.tpot.observe(timings.tpot_s, tags=tags)
        self.log.info(
            "%s %s: %s: %d+%d tokens, queued %.1f ms, first token %.1f ms, total %.1f ms",
            mode,
            adapter,
            request_id,
            prompt_tokens,
            completion_tokens,
            1000 * timings.queued_s,
            1000 * timings.ttft_s,
            1000 * timings.total_s,
            extra={
                "ray_serve_extra_fields": {
                    "moe": {"request_id": request_id, "adapter": adapter, "mode": mode}
                }
            },
        )

    def engine_state(self, stats: Mapping[str, int]) -> None:
        """The engine scheduler's state (:meth:`~moe_core.engine.scheduler.Scheduler.stats`): gauges as
        they are, counters by what they grew since the last report."""
        self.queue_depth.set(stats.get("queued", 0))
        self.in_flight.set(stats.get("running", 0))
        for key, gauge in self.kv_gauges.items():
            if key in stats:
                gauge.set(stats[key])
        counters = [(k, c, 1.0) for k, c in self.kv_counters.items()]
        counters += [(k, c, unit) for k, (c, unit) in self.grammar_counters.items()]
        for key, counter, unit in counters:
            grew = stats.get(key, 0) - self._seen.get(key, 0)
            if grew > 0:
                counter.inc(grew * unit)
                self._seen[key] = stats[key]


class DynamicMetrics(ForwardMetrics):
    """Batching and the adapter cache of one dynamic replica (also the cache's event sink)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = _histogram(
            "moe_batch_rows", "Most rows in a decode step while a request ran.", COUNT_BUCKETS, ()
        )
        self.adapters = _histogram(
            "moe_batch_adapters",
            "Most distinct adapters in a decode step while a request ran.",
            COUNT_BUCKETS,
            (),
        )
        self.resident = _gauge("moe_adapters_resident", "Adapters resident in the LRU.", ())
        self.loads = _counter("moe_adapter_loads", "Adapter loads into the LRU.", ("adapter",))
        self.evictions = _counter("moe_adapter_evictions", "Adapters evicted from the LRU.", ("adapter",))
        self.load_failures = _counter("moe_adapter_load_failures", "Adapter loads that failed.", ("adapter",))
        self.load_time = _histogram(
            "moe_adapter_load_seconds", "Adapter load time.", LATENCY_BUCKETS, ("adapter",)
        )

    def loaded(self, adapter: str, seconds: float, resident: int) -> None:
        self.loads.inc(tags={"adapter": adapter})
        self.load_time.observe(seconds, tags={"adapter": adapter})
        self.resident.set(resident)

    def evicted(self, adapter: str, resident: int) -> None:
        self.evictions.inc(tags={"adapter": adapter})
        self.resident.set(resident)

    def failed(self, adapter: str) -> None:
        self.load_failures.inc(tags={"adapter": adapter})


class MergedMetrics(ForwardMetrics):
    """The merged model a replica serves."""

    def __init__(self) -> None:
        super().__init__()
        self.version = _gauge(
            "moe_merged_version_info", "1 for the merged version served.", ("adapter", "version")
        )
        self.load_time = _histogram(
            "moe_model_load_seconds", "Merged model load time.", LATENCY_BUCKETS, ("adapter",)
        )

    def serving(self, adapter: str, version: str, old: str | None, seconds: float) -> None:
        if old is not None:
            self.version.set(0, tags={"adapter": adapter, "version": old})
        self.version.set(1, tags={"adapter": adapter, "version": version})
        self.load_time.observe(seconds, tags={"adapter": adapter})


#: Seconds, for merges and model loads of promotions: from a second to 20 minutes (an 8B merge on a GPU).
SWITCH_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0]


class PromotionMetrics:
    """The promotion controller's decisions, what each promotion slot holds, and how long promotions take."""

    def __init__(self) -> None:
        self.switches = _counter(
            "moe_promotion_switches",
            "Promotion decisions by kind (promote, demote), adapter and outcome (done, failed).",
            ("kind", "adapter", "outcome"),
        )
        self.slot = _gauge(
            "moe_promotion_slot_info",
            "1 for the adapter and state each promotion slot holds.",
            ("slot", "adapter", "state"),
        )
        self.seconds = _histogram(
            "moe_promotion_seconds",
            "A promotion's parts: merge, load (the slot loads the merged model), total (decision to routed).",
            SWITCH_BUCKETS,
            ("part",),
        )
        self._held: dict[int, dict[str, str]] = {}

    def holds(self, slot: int, adapter: str | None, state: str | None) -> None:
        """Slot ``slot`` now holds ``adapter`` in ``state`` (None: free)."""
        old = self._held.pop(slot, None)
        if old is not None:
            self.slot.set(0, tags=old)
        if adapter is not None and state is not None:
            tags = {"slot": str(slot), "adapter": adapter, "state": state}
            self.slot.set(1, tags=tags)
            self._held[slot] = tags


class ReplicaErrorLog(logging.Filter):
    """Serve logs every exception a replica raises at ERROR with its traceback ("Request failed."): a
    client's bad request (a 4xx at the gateway) or a condition the gateway answers itself (a merged model
    not up: it falls back) is logged at the level ``levels`` gives its type, in one line, without the
    traceback. Anything else stays an ERROR with its traceback."""

    def __init__(self, levels: Mapping[type[BaseException], int]) -> None:
        super().__init__()
        self.levels = dict(levels)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or record.msg != "Request failed.":
            return True
        level = next((lv for kind, lv in self.levels.items() if isinstance(exc, kind)), None)
        if level is not None:
            record.levelno, record.levelname = level, logging.getLevelName(level)
            record.msg, record.args = f"Request refused: {type(exc).__name__}: {exc}", ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_errors(levels: Mapping[type[BaseException], int]) -> None:
    """Install :class:`ReplicaErrorLog` on Serve's replica logger (once a process)."""
    serve_logger = logging.getLogger("ray.serve")
    for f in list(serve_logger.filters):
        if isinstance(f, ReplicaErrorLog):
            serve_logger.removeFilter(f)
    serve_logger.addFilter(ReplicaErrorLog(levels))
