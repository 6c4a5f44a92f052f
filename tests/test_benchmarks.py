"""Smoke tests of the benchmark scripts: each runs end to end at a tiny size and writes the JSON
that benchmarks/README.md describes, plus the pure helpers they rely on.

No timing asserts: numbers from a busy 2-core box mean nothing; what must hold is that every
path and every run is there, with finite metrics, and that the LoRA paths compute the same thing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common, layer_bench, serving_bench  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_script(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# ---- Helpers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "allowed"), [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16)])
def test_vllm_max_lora_rank(rank: int, allowed: int) -> None:
    assert common.vllm_max_lora_rank(rank) == allowed


def test_inflection_rank() -> None:
    ranks = [1, 2, 4, 8]
    flora = {1: 10.0, 2: 9.0, 4: 6.0, 8: 3.0}  # tok/s
    assert common.inflection_rank(ranks, flora, {r: 7.0 for r in ranks}) == 4
    assert common.inflection_rank(ranks, flora, {r: 1.0 for r in ranks}) is None
    times = {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0}  # us: lower is better
    assert common.inflection_rank(ranks, times, {r: 3.0 for r in ranks}, False) == 4


def test_cost_model_recovers_exact_constants() -> None:
    """Times made by the model itself: the fit gives back c1, c2 and the inflection."""
    in_f, out_f, n_tok, c2 = 64, 64, 4, 1e-10
    q = 11 / 12  # the paper's 2·c1/(d·c2): break-even at r = 1 / (1 - q) = 12
    c1 = q * c2 * in_f * out_f / (in_f + out_f)
    ranks = [1, 2, 4, 8, 16]
    base = c2 * n_tok * in_f * out_f * 1e6  # us
    flora = {r: c2 * r * n_tok * in_f * out_f * 1e6 for r in ranks}
    lora = {r: base + c1 * r * n_tok * (in_f + out_f) * 1e6 for r in ranks}
    fit = layer_bench.fit_cost_model(in_f, out_f, n_tok, ranks, base, flora, lora)
    assert fit["c1_s_per_mac"] == pytest.approx(c1)
    assert fit["c2_s_per_mac"] == pytest.approx(c2)
    assert fit["q_2c1_over_d_c2"] == pytest.approx(2 * c1 / (in_f * c2)) == pytest.approx(q)
    assert fit["break_even_rank"] == pytest.approx(12)
    assert fit["predicted_inflection"] == fit["measured_inflection"] == 16


def test_serving_plan_groups_by_max_lora_rank() -> None:
    plans, skipped = serving_bench.plan_servers(
        ["base", "lora", "flora", "mixed"], [1, 2, 4, 16], [1, 40], cap=32
    )
    assert [p.key for p in plans] == [
        "base", "n1-maxrank1", "n1-maxrank8", "n1-maxrank16",
        "n40-maxrank1", "n40-maxrank8", "n40-maxrank16",
    ]  # fmt: skip
    assert plans[0].max_lora_rank is None and [r.id for r in plans[0].runs] == ["base"]
    assert {s["num_adapters"] for s in skipped} == {1}  # mixed needs two adapters
    by_key = {p.key: p for p in plans}
    assert [r.id for r in by_key["n40-maxrank8"].runs] == [
        "lora-r2-n40", "flora-r2-n40", "mixed-r2-n40",
        "lora-r4-n40", "flora-r4-n40", "mixed-r4-n40",
    ]  # fmt: skip
    assert by_key["n40-maxrank8"].max_loras == 32  # the cap
    mixed = next(r for r in by_key["n40-maxrank16"].runs if r.mode == "mixed")
    assert len(mixed.adapters) == len(set(mixed.adapters)) == 40
    assert sum(a.startswith("flora-r16-") for a in mixed.adapters) == 20


def test_serving_plan_puts_dora_beside_lora_and_ia3_once_per_count() -> None:
    """DoRA runs per rank on LoRA's server; IA3 (no rank) once per N on its first server."""
    plans, _ = serving_bench.plan_servers(["base", "lora", "dora", "ia3"], [1, 8], [2], cap=32)
    runs = [(p.key, r.id, r.rank, r.adapters) for p in plans for r in p.runs]
    assert runs == [
        ("base", "base", None, []),
        ("n2-maxrank1", "ia3-n2", None, ["ia3-0", "ia3-1"]),
        ("n2-maxrank1", "lora-r1-n2", 1, ["lora-r1-0", "lora-r1-1"]),
        ("n2-maxrank1", "dora-r1-n2", 1, ["dora-r1-0", "dora-r1-1"]),
        ("n2-maxrank8", "lora-r8-n2", 8, ["lora-r8-0", "lora-r8-1"]),
        ("n2-maxrank8", "dora-r8-n2", 8, ["dora-r8-0", "dora-r8-1"]),
    ]
    for name in ("ia3-1", "dora-r8-0", "flora-r16-31"):
        kind, rank, index = serving_bench.parse_adapter_name(name)
        assert serving_bench.adapter_name(kind, rank, index) == name


def test_serving_plan_measures_base_on_the_adapter_server_once_per_count() -> None:
    plans, _ = serving_bench.plan_servers(["base", "base-lora", "flora"], [1, 8], [4], cap=32)
    runs = [(p.key, r.id, r.adapters) for p in plans for r in p.runs]
    assert runs == [
        ("base", "base", []),
        ("n4-maxrank1", "base-lora-n4", []),  # base requests, adapters on
        ("n4-maxrank1", "flora-r1-n4", [f"flora-r1-{i}" for i in range(4)]),
        ("n4-maxrank8", "flora-r8-n4", [f"flora-r8-{i}" for i in range(4)]),
    ]


# ---- Layer benchmark ----------------------------------------------------------------------------
def _check_layer_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert result["kind"] == "layer"
    assert set(result["paths"]) == set(layer_bench.PATHS)  # every path: timed or skipped, why
    live = {p for p, v in result["paths"].items() if v["skipped"] is None}
    assert {"base", "flora_torch", "lora_bmm", "lora_gathered"} <= live
    rows = result["results"]
    assert {(r["tokens"], r["rank"]) for r in rows} == {(1, 1), (1, 2), (8, 1), (8, 2)}
    for r in rows:
        assert not r["failed"]
        for p in live:
            assert math.isfinite(r["median_us"][p]) and r["median_us"][p] > 0, (p, r)
        for p, err in r["rel_err_vs_reference"].items():  # the LoRA paths agree with bmm
            assert err < 1e-4, (p, err, r)
    assert result["cost_model"]
    for m in result["cost_model"]:
        assert {"predicted_inflection", "measured_inflection", "c1_s_per_mac"} <= set(m)
    assert result["machine"]["cpu_model"] and result["versions"]["torch"]
    assert result["settings"]["dtype"] == "float32"
    return result


def test_layer_bench_smoke(tmp_path: Path) -> None:
    run_script(["benchmarks/layer_bench.py", "--smoke", "--out", str(tmp_path)], timeout=300)
    result = _check_layer_result(tmp_path / "layer_cpu-smoke.json")
    if importlib.util.find_spec("vllm") is not None:
        assert result["paths"]["vllm_lora_torch"]["skipped"] is None
    assert (tmp_path / "layer_cpu-smoke.png").exists() == HAS_MATPLOTLIB


def test_layer_bench_needs_no_vllm(tmp_path: Path) -> None:
    """The GPU box has torch and triton but no vLLM: its paths are skipped, the rest runs."""
    code = (
        "import runpy, sys; sys.modules['vllm'] = None; "  # `import vllm` now raises
        f"sys.argv = ['layer_bench.py', '--smoke', '--no-plot', '--out', {str(tmp_path)!r}]; "
        "runpy.run_path('benchmarks/layer_bench.py', run_name='__main__')"
    )
    run_script(["-c", code], timeout=300)
    result = _check_layer_result(tmp_path / "layer_cpu-smoke.json")
    assert "vLLM does not import" in result["paths"]["vllm_lora_torch"]["skipped"]


# ---- The GPU run (benchmarks/gpu/run.sh): its CPU variant under Triton's interpreter ---------
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _no_vllm_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Pythons cannot import vLLM, as on the lent GPU box: a `vllm.py`
    that raises sits first on the path (every process run.sh starts inherits it)."""
    shadow = tmp_path / "no_vllm"
    shadow.mkdir()
    (shadow / "vllm.py").write_text("raise ImportError('vLLM hidden: the GPU box has none')\n")
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHON": sys.executable}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gpu_run_sh_tiny_without_vllm(tmp_path: Path) -> None:
    """`bash benchmarks/gpu/run.sh --tiny`, vLLM hidden: the check runs the fused FLoRA kernel
    against the torch op and the vendored vLLM lora_shrink/lora_expand against a torch LoRA,
    then layer_bench times every Triton path with the vendored kernels; all interpreted."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--tiny", "--out", str(out)],
        cwd=REPO, env=_no_vllm_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    check = json.loads((out / "check_cpu-tiny.json").read_text())
    assert check["passed"] and check["settings"]["triton_interpret"]
    assert {c["kernel"] for c in check["cases"]} == {"flora", "lora"}
    assert all(c["ok"] for c in check["cases"]), check["cases"]
    assert check["vllm_lora_triton_source"].startswith("vendored from vLLM")

    layer = json.loads((out / "layer_cpu-tiny_fp16.json").read_text())
    paths = layer["paths"]
    assert paths["flora_triton"]["skipped"] is None
    assert paths["vllm_lora_triton"]["skipped"] is None
    assert paths["vllm_lora_triton"]["source"].startswith("vendored from vLLM")
    assert "vLLM does not import" in paths["vllm_lora_torch"]["skipped"]
    assert layer["settings"]["dtype"] == "float16" and layer["results"]
    for row in layer["results"]:
        assert not row["failed"], row
        errs = row["rel_err_vs_reference"]
        assert errs["flora_triton"] < 1e-2 and errs["vllm_lora_triton"] < 1e-2, errs
    assert (out / "layer_cpu-tiny_fp16.png").exists() == HAS_MATPLOTLIB
    assert "== done" in (out / "run_cpu-tiny.log").read_text()


def test_vendored_vllm_lora_is_current() -> None:
    """benchmarks/gpu/vendor/vllm_lora is what vendor_vllm_lora.py makes of the installed vLLM
    (when it is the release the copy names), and every file names that release."""
    from benchmarks.gpu import vendor_vllm_lora as vendor

    init = Path(vendor.VENDOR_DIR, "__init__.py").read_text()
    version = init.split('VLLM_VERSION = "', 1)[1].split('"', 1)[0]
    for name in vendor.FILES:
        text = Path(vendor.VENDOR_DIR, name).read_text()
        assert f"# Vendored from vLLM {version}, vllm/lora/ops/triton_ops/{name}" in text
        assert "from vllm" not in text and "torch.ops.vllm." not in text
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: nothing to compare the copy with")
    if vendor.vllm_version() != version:
        pytest.skip(f"installed vLLM {vendor.vllm_version()} is not {version}, the vendored one")
    for name, text in vendor.vendored().items():
        assert Path(vendor.VENDOR_DIR, name).read_text() == text, (
            f"{name} differs: run python benchmarks/gpu/vendor_vllm_lora.py"
        )


# ---- Serving benchmark --------------------------------------------------------------------------
METRICS = ("request_throughput", "output_throughput") + tuple(
    f"{stat}_{m}_ms" for stat in ("mean", "median", "p99") for m in ("ttft", "tpot", "itl")
)


def test_serving_bench_smoke(tmp_path: Path) -> None:
    """Tiny LLaMA, rank 1, two adapters: base, FLoRA, LoRA, DoRA and IA3 runs (the last two
    PEFT-made), each with vLLM's metrics."""
    results = tmp_path / "results"
    run_script(
        [
            "benchmarks/serving_bench.py", "--tiny",
            "--modes", "base", "base-lora", "flora", "lora", "dora", "ia3", "--ranks", "1",
            "--num-adapters", "2",
            "--num-prompts", "4", "--input-len", "16", "--output-len", "8",
            "--max-concurrency", "4",
            "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
            "--tag", "smoke", "--no-plot",
        ],  # fmt: skip
        timeout=900,
    )
    result = json.loads((results / "smoke.json").read_text())
    assert result["kind"] == "serving"
    runs = {r["id"]: r for r in result["runs"]}
    assert set(runs) == {
        "base", "base-lora-n2", "lora-r1-n2", "flora-r1-n2", "dora-r1-n2", "ia3-n2"
    }
    for run in runs.values():
        assert run["error"] is None, run
        m = run["metrics"]
        assert m["completed"] == 4 and m["failed"] == 0  # an unknown adapter name would fail
        for key in METRICS:
            assert math.isfinite(m[key]) and m[key] >= 0, (run["id"], key, m.get(key))
        assert os.path.exists(run["raw_result"])  # vLLM's own result file
    assert runs["flora-r1-n2"]["adapters"] == ["flora-r1-0", "flora-r1-1"]
    assert runs["lora-r1-n2"]["adapters"] == ["lora-r1-0", "lora-r1-1"]
    assert runs["dora-r1-n2"]["adapters"] == ["dora-r1-0", "dora-r1-1"]
    assert runs["ia3-n2"]["adapters"] == ["ia3-0", "ia3-1"] and runs["ia3-n2"]["rank"] is None
    adapters = tmp_path / "work" / "adapters" / Path(result["model"]["path"]).name
    for name, peft_type, dora in (("dora-r1-0", "LORA", True), ("ia3-0", "IA3", None)):
        cfg = json.loads((adapters / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == peft_type and cfg.get("use_dora") == dora, cfg  # PEFT's own

    servers = {s["key"]: s for s in result["servers"]}
    assert servers["base"]["args"][-1] == "--no-enable-lora"  # the true vLLM baseline
    lora_args = " ".join(servers["n2-maxrank1"]["args"])
    # every adapter the server hosts: 2 each of FLoRA, LoRA, DoRA and IA3
    assert "--max-lora-rank 1 --max-loras 2 --max-cpu-loras 8" in lora_args
    assert servers["n2-maxrank1"]["env"]["FLORA_EXECUTION"] == "auto"

    row = result["summary"]["2"]["by_rank"]["1"]
    assert row["flora_over_base"] > 0 and row["flora_over_lora"] > 0
    assert result["summary"]["2"]["base_on_adapter_server_over_plain"] > 0
    assert row["dora_over_lora"] > 0 and result["summary"]["2"]["ia3_over_base"] > 0
    assert result["model"]["params_m"] > 0 and result["machine"]["logical_cpus"]
    assert result["versions"]["flora-vllm"]


def test_tenants_bench_smoke(tmp_path: Path) -> None:
    """Tiny LLaMA, FLoRA r=1 tenants from the adapter root: distinct adapters per step 1 and 4,
    8 and 16 registered, 3 cold starts, next to the plain server (LoRA off)."""
    results = tmp_path / "results"
    run_script(
        [
            "benchmarks/tenants_bench.py", "--tiny", "--kinds", "flora-r1",
            "--distinct", "1", "4", "--concurrency", "4", "--prompts-per-run", "8",
            "--registered", "8", "16", "--working-set", "4", "--cold", "3",
            "--input-len", "16", "--output-len", "4", "--kv-cache-gib", "1",
            "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
            "--tag", "smoke", "--no-plot",
        ],  # fmt: skip
        timeout=900,
    )
    result = json.loads((results / "smoke.json").read_text())
    assert result["kind"] == "tenants"
    runs = {r["id"]: r for r in result["runs"]}
    assert set(runs) == {"base", "flora-r1-n1", "flora-r1-n4"}
    for run in [*runs.values(), *result["registered"]]:
        assert run["error"] is None, run
        assert run["metrics"]["completed"] == 8 and run["metrics"]["failed"] == 0
        assert run["rss_mib"] > 0
    assert [r["registered"] for r in result["registered"]] == [8, 16]
    cold = result["cold_start"]["flora-r1"]
    assert len(cold["cold_s"]) == 3 and all(t > 0 for t in cold["cold_s"] + cold["warm_s"])
    servers = {s["key"]: s for s in result["servers"]}
    assert "--no-enable-lora" in servers["base"]["args"]  # the true vLLM baseline
    assert "--adapter-root" in servers["r1"]["args"]  # nothing named at start-up
    assert not any(a.startswith("--lora-modules") for a in servers["r1"]["args"])
    goals = result["summary"]["goals"]
    assert goals["flora_r1_tps_4_over_1_distinct"] > 0
    assert set(goals["flora_r1_over_base"]) == {"1", "4"}



def test_tenants_engine_smoke(tmp_path: Path) -> None:
    """vLLM's engine in-process on the tiny LLaMA: base requests and 1 and 4 distinct FLoRA
    r=1 adapters per step, every token made (the script checks the count), one rep each."""
    results = tmp_path / "results"
    run_script(
        [
            "benchmarks/tenants_engine.py", "--tiny", "--distinct", "0", "1", "4",
            "--prompts", "8", "--input-len", "16", "--output-len", "4", "--reps", "1",
            "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
            "--tag", "smoke", "--no-plot",
        ],  # fmt: skip
        timeout=900,
    )
    result = json.loads((results / "smoke.json").read_text())
    assert result["kind"] == "tenants_engine"
    assert set(result["reps"]) == {"0", "1", "4"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["reps"].values())
    assert result["summary"]["over_1_distinct"]["1"] == 1.0

@pytest.mark.slow
def test_engine_breakdown_smoke(tmp_path: Path) -> None:
    """vLLM's engine in-process on the tiny LLaMA, per adapter kind: every section timed where
    that kind's layers run it, and no punica op for IA3 (no LoRA weights in any slot)."""
    results = tmp_path / "results"
    run_script(
        [
            "benchmarks/engine_breakdown.py", "--tiny", "--modes", "plain", "flora", "ia3",
            "lora", "--num-adapters", "2", "--prompts", "8", "--input-len", "32",
            "--output-len", "4", "--max-num-seqs", "8", "--reps", "1",
            "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
            "--tag", "smoke", "--no-plot",
        ],  # fmt: skip
        timeout=900,
    )
    result = json.loads((results / "smoke.json").read_text())
    modes = result["modes"]
    assert result["kind"] == "engine_breakdown"
    assert set(modes) == {"plain", "flora", "ia3", "lora"}
    assert all(m["tok_s"][0] > 0 and m["tokens"] == 8 * 4 for m in modes.values())
    assert modes["plain"]["calls"] == {}  # its linears run inside vLLM's compiled graph
    assert modes["flora"]["calls"]["slice_gemm"] > 0 and modes["flora"]["calls"]["scale_out"] > 0
    assert "lora_on_output" not in modes["flora"]["calls"]
    assert "lora_on_output" not in modes["ia3"]["calls"]  # IA3 holds no LoRA weights
    assert modes["lora"]["calls"]["lora_on_output"] > 0
    assert result["summary"]["plain"]["over_plain"] == 1.0


def test_policy_bench_smoke(tmp_path):
    """The execution-policy layer benchmark runs end to end and records every cell."""
    from benchmarks import policy_bench

    assert policy_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "policy_cpu_smoke.json").read_text())
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["auto_choice"] in ("expanded", "merged")
        assert all(row[k] > 0 for k in ("expanded_x", "merged_x", "auto_x"))


def test_served_layer_bench_smoke(tmp_path: Path) -> None:
    """The real FLoRA layers of a tiny LLaMA against vLLM's packed GEMM and LoRA: every path
    timed at every point, the FLoRA paths equal to the rank-1 formula, the parts recorded."""
    from benchmarks import served_layer_bench

    run_script(
        ["benchmarks/served_layer_bench.py", "--smoke", "--out", str(tmp_path)], timeout=300
    )
    result = json.loads((tmp_path / "served_layer_cpu-smoke.json").read_text())
    assert result["kind"] == "served_layer"
    rows = result["results"]
    assert {(r["layer"], r["tokens"]) for r in rows} == {
        (name, t) for name in ("qkv", "o", "gate_up", "down") for t in (1, 8)
    }
    for r in rows:
        want = set(served_layer_bench.PATHS) - ({"flora_half_1", "flora_half_T"}
                                                 if r["tokens"] == 1 else set())
        if len(r["out_slices"]) == 1:
            want.discard("flora_tied_T")
        assert set(r["times"]) == want, r["layer"]
        for p, t in r["times"].items():
            assert math.isfinite(t["median_us"]) and t["median_us"] > 0, (p, r)
            assert t["ratio_to_packed"] > 0
        for p, err in r["rel_err"].items():
            assert err < 1e-5, (p, err, r["layer"])
        assert r["breakdown"]["flora_all_T"]["gemm"] > 0
    assert (tmp_path / "served_layer_cpu-smoke.png").exists() == HAS_MATPLOTLIB
