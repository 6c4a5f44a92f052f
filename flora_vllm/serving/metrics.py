"""Per-adapter Prometheus metrics, exposed on vLLM's own `/metrics` (no vLLM import here).

vLLM's metrics are per engine; an operator serving hundreds of tenants needs them per adapter:
who sends traffic, how many tokens, how slow, and whether the adapter sits in a device slot or
only in the host cache (a cold adapter pays a load on its next request). Base-model requests are
counted under `adapter=""`, `adapter_type="base"`.

Bounded: an adapter's series are removed once it is unloaded and its last request is gone
(`forget`), and at most `FLORA_METRICS_MAX_ADAPTERS` (default 1024) adapters have series of
their own at a time; requests of any further adapter are counted under `adapter="_other"`.

Runs in: the API server (or a Ray replica), where requests finish; the Ray ingress renders.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LABELS = ("adapter", "adapter_type")
LOCATIONS = ("device", "host")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

REQUESTS = Counter(
    "flora:adapter_requests",
    "Finished requests per adapter and finish reason (stop, length, abort, ...).",
    [*LABELS, "finished_reason"],
)
PROMPT_TOKENS = Counter(
    "flora:adapter_prompt_tokens", "Prompt tokens of finished requests per adapter.", LABELS
)
GENERATION_TOKENS = Counter(
    "flora:adapter_generation_tokens", "Generated tokens of finished requests per adapter.", LABELS
)
E2E_LATENCY = Histogram(
    "flora:adapter_e2e_request_latency_seconds",
    "Arrival to last token, per adapter.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "flora:adapter_time_to_first_token_seconds",
    "Arrival to first token, per adapter.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "flora:adapter_requests_in_flight",
    "Requests of each adapter in the engine now (read at scrape time).",
    LABELS,
)
RESIDENT = Gauge(
    "flora:adapter_resident",
    "1 where a served adapter is held: location=device is one of the --max-loras slots the "
    "batch reads; location=host is the --max-cpu-loras cache only. 0/0: loaded from disk on "
    "its next request. Read at scrape time.",
    [*LABELS, "location"],
)


OTHER = "_other"  # the adapter label once MAX_ADAPTERS adapters have series
MAX_ADAPTERS = int(os.environ.get("FLORA_METRICS_MAX_ADAPTERS", "1024"))
_lock = threading.Lock()
_series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # adapter -> (family, label values)


def _labels(metric: Any, adapter: str, *rest: str) -> Any:
    """`metric.labels(...)` for an adapter, the label set remembered (for `forget`) and the
    adapter folded into `OTHER` once `MAX_ADAPTERS` others have series."""
    with _lock:
        if adapter not in _series and adapter and len(_series) >= MAX_ADAPTERS:
            adapter = OTHER
        values = (adapter, *rest)
        _series.setdefault(adapter, set()).add((metric, values))
    return metric.labels(*values)


def forget(adapter: str) -> None:
    """Remove every recorded series of `adapter` (it is gone: unloaded, last request done)."""
    with _lock:
        owned = _series.pop(adapter, set())
    for metric, values in owned:
        try:
            metric.remove(*values)
        except KeyError:  # already cleared (a scrape-time gauge)
            pass


def tracked_adapters() -> int:
    """How many adapters have series of their own now (bounded by MAX_ADAPTERS + OTHER)."""
    with _lock:
        return len(_series)


def record_finished(
    adapter: str,
    adapter_type: str,
    finished_reason: str,
    prompt_tokens: int,
    generation_tokens: int | None,
    e2e_s: float | None,
    ttft_s: float | None,
) -> None:
    """Count one finished (or aborted) request; None = not known (vLLM stats logging off)."""
    labels = (adapter, adapter_type)
    _labels(REQUESTS, *labels, finished_reason).inc()
    _labels(PROMPT_TOKENS, *labels).inc(prompt_tokens)
    if generation_tokens is not None:
        _labels(GENERATION_TOKENS, *labels).inc(generation_tokens)
    if e2e_s is not None:
        _labels(E2E_LATENCY, *labels).observe(e2e_s)
    if ttft_s:  # 0.0: no token came (aborted in the queue)
        _labels(TTFT, *labels).observe(ttft_s)


def set_live_state(
    in_flight: dict[tuple[str, str], int] | None,
    residency: Iterable[tuple[str, str, str | None]] | None,
) -> None:
    """Replace the scrape-time gauges: in-flight counts per (adapter, type) and (adapter, type,
    location or None) for every served adapter; None leaves that family as it was (unreadable
    this scrape)."""
    if in_flight is not None:
        IN_FLIGHT.clear()
    for labels, n in (in_flight or {}).items():
        IN_FLIGHT.labels(*labels).set(n)
    if residency is None:
        return
    RESIDENT.clear()
    for adapter, adapter_type, location in residency:
        for loc in LOCATIONS:
            RESIDENT.labels(adapter, adapter_type, loc).set(1.0 if loc == location else 0.0)


FAMILIES = (REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS, E2E_LATENCY, TTFT, IN_FLIGHT, RESIDENT)


def snapshot() -> list[dict[str, Any]]:
    """This process's per-adapter samples as plain data (a Ray replica sends them to the
    ingress, which serves every replica's on one `/metrics`)."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "doc": family.documentation,
            "samples": [(s.name, dict(s.labels), s.value) for s in family.samples],
        }
        for metric in FAMILIES
        for family in metric.collect()
    ]


def render(snapshots: Mapping[str, list[dict[str, Any]]]) -> str:
    """Prometheus text of several processes' snapshots, each sample labelled `replica=<key>`."""
    merged: dict[str, Metric] = {}
    for replica, families in snapshots.items():
        for f in families:
            family = merged.setdefault(f["name"], Metric(f["name"], f["doc"], f["type"]))
            for name, labels, value in f["samples"]:
                family.add_sample(name, {**labels, "replica": replica}, value)

    class _Snapshots(Collector):
        def collect(self) -> Iterable[Metric]:
            return merged.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshots())
    return generate_latest(registry).decode()
