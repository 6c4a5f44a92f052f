"""Per-adapter Prometheus metrics, exposed on vLLM's own `/metrics` (no vLLM import here).

vLLM's metrics are per engine; an operator serving hundreds of tenants needs them per adapter:
who sends traffic, how many tokens, how slow, and whether the adapter sits in a device slot or
only in the host cache (a cold adapter pays a load on its next request). Base-model requests are
counted under `adapter=""`, `adapter_type="base"`.
"""

from __future__ import annotations

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
    REQUESTS.labels(*labels, finished_reason).inc()
    PROMPT_TOKENS.labels(*labels).inc(prompt_tokens)
    if generation_tokens is not None:
        GENERATION_TOKENS.labels(*labels).inc(generation_tokens)
    if e2e_s is not None:
        E2E_LATENCY.labels(*labels).observe(e2e_s)
    if ttft_s:  # 0.0: no token came (aborted in the queue)
        TTFT.labels(*labels).observe(ttft_s)


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
