"""The workload benchmark (`benchmarks/workload_bench.py`): Punica's popularity patterns and
S-LoRA's SLO attainment as the script computes them, and one tiny run end to end (a plain and
an adapter server, every run with vLLM's metrics and an attainment)."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import workload_bench  # noqa: E402

NAMES = [f"a{i}" for i in range(16)]


def test_popularity_patterns_draw_as_published():
    """distinct: each adapter once, in turn; identical: one; uniform: all N; skewed: drawing
    from the list gives adapter k about k^-1.5 of adapter 1's share (Punica's Zipf 1.5)."""
    assert workload_bench.popularity_plan("distinct", NAMES, 1.5) == (NAMES, "round-robin")
    assert workload_bench.popularity_plan("identical", NAMES, 1.5) == (NAMES[:1], "random")
    assert workload_bench.popularity_plan("uniform", NAMES, 1.5) == (NAMES, "random")
    skewed, how = workload_bench.popularity_plan("skewed", NAMES, 1.5)
    assert how == "random" and set(skewed) == set(NAMES)
    rng = random.Random(0)
    counts = collections.Counter(rng.choice(skewed) for _ in range(200_000))
    for k in (2, 4, 8):
        share = counts[NAMES[k - 1]] / counts[NAMES[0]]
        assert share == pytest.approx(k ** -1.5, rel=0.1), (k, share)


def test_slo_attainment_counts_failures_as_misses():
    result = {"ttfts": [0.2, 0.9, 1.5, 0.0, 0.3], "errors": ["", "", "", "timeout", "boom"]}
    assert workload_bench.slo_attainment(result, 1000, 5) == pytest.approx(2 / 5)
    assert workload_bench.slo_attainment(result, 2000, 5) == pytest.approx(3 / 5)
    assert workload_bench.slo_attainment({}, 1000, 5) is None  # no per-request TTFTs saved


@pytest.mark.slow  # two servers and 10 runs: 3-5 min here; the pure parts are tested above
def test_workload_bench_smoke(tmp_path: Path):
    """Tiny LLaMA, 4 adapters a kind, two patterns and both arrival processes: every run
    completes with vLLM's metrics and an SLO attainment in [0, 1]."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "benchmarks/workload_bench.py", "--tiny", "--num-adapters", "4",
         "--num-prompts", "4", "--max-concurrency", "4", "--input-len", "16",
         "--output-len", "4", "--request-rate", "8", "--max-loras-cap", "2",
         "--popularity", "distinct", "skewed", "--workdir", str(tmp_path / "work"),
         "--results-dir", str(results), "--tag", "smoke", "--no-plot"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "smoke.json").read_text())
    runs = {r["id"]: r for r in result["runs"]}
    want = {f"{m}-{p}-{a}" for m in ("lora", "flora") for p in ("distinct", "skewed")
            for a in ("poisson", "gamma")} | {"base-poisson", "base-gamma"}
    assert set(runs) == want
    for run in runs.values():
        assert run["error"] is None, run
        assert run["metrics"]["completed"] == 4
        assert 0 <= run["slo_attainment"] <= 1
    assert runs["flora-distinct-gamma"]["distinct_adapters"] == 4
    assert runs["lora-skewed-poisson"]["distinct_adapters"] == 4
    row = result["summary"]["gamma/skewed"]
    assert row["flora_over_lora"] is not None and row["flora_over_base"] is not None
