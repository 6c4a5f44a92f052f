"""Per-adapter metrics stay bounded: series removed with their adapter, and a cap on how many
adapters have series at all (pure prometheus_client, no server)."""

from __future__ import annotations

from prometheus_client import generate_latest

from flora_vllm.serving import metrics


def _adapters_in(family) -> set[str]:
    return {s.labels["adapter"] for f in family.collect() for s in f.samples}


def test_forget_removes_every_series_of_one_adapter_only():
    for name in ("t-keep", "t-gone"):
        metrics.record_finished(name, "flora", "stop", 5, 3, 0.5, 0.1)
    metrics.record_finished("t-gone", "flora", "abort", 5, None, None, 0.0)
    assert {"t-keep", "t-gone"} <= _adapters_in(metrics.REQUESTS)
    metrics.forget("t-gone")
    for family in (metrics.REQUESTS, metrics.PROMPT_TOKENS, metrics.GENERATION_TOKENS,
                   metrics.E2E_LATENCY, metrics.TTFT):
        assert "t-gone" not in _adapters_in(family), family
    assert "t-keep" in _adapters_in(metrics.REQUESTS)
    metrics.forget("t-gone")  # twice, or never recorded: nothing happens
    metrics.forget("never-seen")
    metrics.forget("t-keep")


def test_adapters_beyond_the_cap_share_one_series(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_ADAPTERS", metrics.tracked_adapters() + 3)
    names = [f"cap-{i}" for i in range(10)]
    for name in names:
        metrics.record_finished(name, "lora", "stop", 1, 1, 0.1, 0.1)
    seen = _adapters_in(metrics.REQUESTS)
    assert set(names[:3]) <= seen and not set(names[3:]) & seen
    other = metrics.REQUESTS.labels(metrics.OTHER, "lora", "stop")._value.get()
    assert other == 7
    metrics.record_finished("", "base", "stop", 1, 1, 0.1, 0.1)  # base is never folded
    assert "" in _adapters_in(metrics.REQUESTS)
    assert b'adapter="_other"' in generate_latest(metrics.REQUESTS)
    for name in [*names, metrics.OTHER]:
        metrics.forget(name)
    assert not {*names, metrics.OTHER} & _adapters_in(metrics.REQUESTS)
