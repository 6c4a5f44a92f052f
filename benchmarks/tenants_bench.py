"""Thousands of tenants per server: distinct adapters per step, adapters registered, cold starts.

Measured by vLLM's own serving benchmark (`serving_bench.vllm_bench`, the code behind `vllm bench
serve`) against real vLLM servers this script starts, with adapters served from a folder on
first use (`--adapter-root`, `flora_vllm.serving.resolver`): nothing is named at start-up.

1. Distinct adapters per step, D in --distinct: --concurrency requests in flight, adapters
   assigned round-robin over D, so every step holds D distinct adapters (C/D requests each);
   output tok/s and TPOT p50/p99 for FLoRA r=1, vLLM LoRA r=1 and r=8, and base (the plain
   server, LoRA off, the reference line). Same concurrency for every D: only D changes.
2. Adapters registered, K in --registered: K FLoRA r=1 tenants resolved (all held in the host
   cache, `--max-cpu-loras`), then the same traffic as (1) over --working-set of them: output
   tok/s and the server's RSS (API server + engine).
3. Cold start: the first request to an adapter in no cache (read from disk through the
   resolver), TTFT for FLoRA r=1 against LoRA r=8, p50 over --cold adapters, next to the warm
   TTFT of the same adapters (their second request).

Servers: `base` (--no-enable-lora), `r1` (--max-lora-rank 1: FLoRA r=1 and LoRA r=1 runs,
registered sweep, FLoRA cold starts) and `r8` (--max-lora-rank 8: LoRA r=8 runs and cold
starts); `--max-loras` = max(D), FLORA_MAX_RANK=1 (`benchmarks/slot_memory.py`).

Output: <results-dir>/<tag>.json (machine, versions, settings, every run's vLLM metrics, RSS,
cold-start samples), <tag>.png, and a printed table with the goal ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common  # noqa: E402
from benchmarks.serving_bench import (  # noqa: E402
    MODEL_SPECS,
    SCALAR,
    Run,
    Workload,
    ensure_model,
    ensure_workdir,
    vllm_bench,
    warm_up,
)
from flora_vllm.serving.server import ServerProcess  # noqa: E402
from flora_vllm.testing import tiny  # noqa: E402

WORKDIR = os.path.join(REPO_ROOT, "benchmarks", ".work")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
KINDS = ("flora-r1", "lora-r1", "lora-r8")


def tenant(kind: str, i: int) -> str:
    return f"{kind}-t{i:05d}"


def ensure_tenants(root: str, model_dir: str, kind: str, n: int) -> list[str]:
    """`n` tenants of `kind` in the adapter root (made once, cached)."""
    names = [tenant(kind, i) for i in range(n)]
    missing = [m for m in names if not os.path.isdir(os.path.join(root, m))]
    if missing:
        method, rank = kind.split("-r")
        if method == "flora":
            tiny.make_tenant_adapters(model_dir, root, missing, tiny.LLAMA_TARGETS, int(rank),
                                      seed=10_000 + len(names) - len(missing))
        else:
            tiny.make_tenant_lora_adapters(model_dir, root, missing, tiny.LLAMA_TARGETS,
                                           int(rank), seed=20_000 * int(rank) + len(names))
    return names


def server_rss(server: ServerProcess) -> int:
    import psutil

    proc = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def ttft(url: str, model: str, prompt: str) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.monotonic() - t0
    raise RuntimeError(f"{model}: no token came")


def measure(server: ServerProcess, model_dir: str, run: Run, wl: Workload,
            args: argparse.Namespace, raw_dir: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": run.id, "mode": run.mode, "rank": run.rank,
                           "distinct": run.num_adapters, "error": None,
                           "load_average_1m": os.getloadavg()[0]}
    print(f"\n=== {run.id} ===", flush=True)
    try:
        rec["warmup_s"] = warm_up(server.url, run.adapters or ["base"])
        res = vllm_bench(server.url, model_dir, run, wl, args, raw_dir, args.seed,
                         assignment="round-robin")
        rec["metrics"] = {k: v for k, v in res.items() if isinstance(v, SCALAR)}
        if res.get("completed") != wl.num_prompts:
            rec["error"] = f"{res.get('failed')} failed, {res.get('completed')} completed"
    except Exception as e:  # one failed run must not lose the sweep
        rec["error"] = repr(e)
        print(f"run {run.id} failed: {e!r}")
    rec["rss_mib"] = server_rss(server) / 2**20
    return rec


def cold_starts(server: ServerProcess, names: list[str]) -> dict[str, Any]:
    """TTFT of each adapter's first request (from disk) and of its second (cached)."""
    cold = [ttft(server.url, n, "def add(a, b):") for n in names]
    warm = [ttft(server.url, n, "def add(a, b):") for n in names]
    return {"adapters": names, "cold_s": cold, "warm_s": warm,
            "cold_p50_s": statistics.median(cold), "warm_p50_s": statistics.median(warm)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="testing.tiny's default model (tests)")
    ap.add_argument("--distinct", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--prompts-per-run", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--registered", nargs="+", type=int, default=[16, 128, 512, 2048])
    ap.add_argument("--working-set", type=int, default=16, help="adapters the (2) traffic uses")
    ap.add_argument("--cold", type=int, default=20)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--kv-cache-gib", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-rate", type=float, default=float("inf"))
    ap.add_argument("--server-timeout", type=float, default=1200.0)
    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--tag")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    spec = tiny.TinySpec() if args.tiny else MODEL_SPECS["llama"]
    tag = args.tag or f"tenants_{'tiny' if args.tiny else 'llama120m'}_{common.now_stamp()}"
    out_json = os.path.join(args.results_dir, f"{tag}.json")
    raw_dir, log_dir = (os.path.join(args.results_dir, tag, d) for d in ("raw", "logs"))
    os.makedirs(raw_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_workdir(args.workdir)
    t0 = time.monotonic()
    model_dir = ensure_model(args.workdir, "llama", spec, args.seed)
    root = os.path.join(args.workdir, "tenants", os.path.basename(model_dir))
    os.makedirs(root, exist_ok=True)
    top = max(args.distinct)
    need = {"flora-r1": max(top, max(args.registered)) + args.cold, "lora-r1": top,
            "lora-r8": top + args.cold}
    names = {k: ensure_tenants(root, model_dir, k, need[k]) for k in args.kinds}
    prep_s = time.monotonic() - t0
    wl = Workload("tenants", args.input_len, args.output_len, args.prompts_per_run,
                  args.concurrency)
    max_model_len = max(256, args.input_len + args.output_len + 64)
    result: dict[str, Any] = {
        "kind": "tenants", "tag": tag, "created": common.now_stamp(),
        "command": [sys.executable, *sys.argv], "machine": common.machine_info(),
        "versions": common.versions(), "git": common.git_revision(REPO_ROOT),
        "settings": {**vars(args), "prepare_s": prep_s, "max_model_len": max_model_len},
        "model": {"path": model_dir, "spec": vars(spec)}, "workload": vars(wl),
        "runs": [], "registered": [], "cold_start": {}, "servers": [],
    }

    def save() -> None:
        result["summary"] = summarize(result)
        common.write_json(out_json, result)

    @contextlib.contextmanager
    def server(key: str, lora_rank: int | None) -> Iterator[ServerProcess]:
        """A started server, stopped on leaving (also when a run raises)."""
        a = ["--served-model-name", "base", "--dtype", "float32", "--seed", str(args.seed),
             "--max-model-len", str(max_model_len), "--max-num-seqs", str(args.concurrency),
             "--no-enable-prefix-caching"]
        if lora_rank is None:
            a += ["--no-enable-lora"]
        else:
            a += ["--enable-lora", "--max-lora-rank", str(lora_rank), "--max-loras", str(top),
                  "--max-cpu-loras", str(max(top, max(args.registered), args.cold) + args.cold),
                  "--adapter-root", root]
        env = {"HF_HUB_OFFLINE": "1", "FLORA_MAX_RANK": "1",
               "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
        log = os.path.join(log_dir, f"{key}.log")
        t = time.monotonic()
        srv = ServerProcess(model_dir, a, env, log_path=log)
        try:
            srv.start(timeout=args.server_timeout)
            result["servers"].append({"key": key, "args": a, "env": env, "log": log,
                                      "startup_s": time.monotonic() - t})
            print(f"server {key} up in {time.monotonic() - t:.0f}s", flush=True)
            yield srv
        finally:
            srv.stop()

    with server("base", None) as srv:
        warm_up(srv.url, ["base"])
        result["runs"].append(measure(srv, model_dir, Run("base", None, 0, []), wl, args, raw_dir))
        save()
    r1 = [k for k in args.kinds if k.endswith("r1")]
    if r1:
        with server("r1", 1) as srv:
            for kind in r1:
                for d in args.distinct:
                    run = Run(kind.split("-")[0], 1, d, names[kind][:d])
                    result["runs"].append(measure(srv, model_dir, run, wl, args, raw_dir))
                    save()
            if "flora-r1" in r1:
                flora = names["flora-r1"]
                fresh = flora[-args.cold:]
                result["cold_start"]["flora-r1"] = cold_starts(srv, fresh)
                save()
                reg_wl = Workload("registered", args.input_len, args.output_len,
                                  args.prompts_per_run, min(args.concurrency, 64))
                registered = 0
                for k in sorted(args.registered):
                    t = time.monotonic()
                    warm_up(srv.url, flora[registered:k], workers=8)  # first use: resolved
                    registered = k
                    run = Run("flora", 1, args.working_set, flora[:args.working_set])
                    rec = measure(srv, model_dir, run, reg_wl, args, raw_dir)
                    rec.update(registered=k, register_s=time.monotonic() - t)
                    result["registered"].append(rec)
                    save()
    if "lora-r8" in args.kinds:
        with server("r8", 8) as srv:
            for d in args.distinct:
                run = Run("lora", 8, d, names["lora-r8"][:d])
                result["runs"].append(measure(srv, model_dir, run, wl, args, raw_dir))
                save()
            result["cold_start"]["lora-r8"] = cold_starts(srv, names["lora-r8"][-args.cold:])
            save()
    save()
    print_table(result["summary"])
    print(f"\nwrote {out_json}")
    if not args.no_plot:
        png = plot(result, out_json.removesuffix(".json") + ".png")
        if png:
            print(f"wrote {png}")
    return out_json


def _metric(rec: dict[str, Any] | None, key: str) -> float | None:
    return ((rec or {}).get("metrics") or {}).get(key)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Throughput per kind and D, the ratios the goals name, registered sweep, cold starts."""
    base = next((r for r in result["runs"] if r["mode"] == "base"), None)
    base_tps = _metric(base, "output_throughput")
    table: dict[str, dict[int, Any]] = {}
    for r in result["runs"]:
        if r["mode"] == "base":
            continue
        kind = f"{r['mode']}-r{r['rank']}"
        table.setdefault(kind, {})[r["distinct"]] = {
            "output_tps": _metric(r, "output_throughput"),
            "tpot_p50_ms": _metric(r, "p50_tpot_ms"), "tpot_p99_ms": _metric(r, "p99_tpot_ms"),
        }
    goals: dict[str, Any] = {}
    flora = table.get("flora-r1", {})
    if flora:
        lo, hi = min(flora), max(flora)
        a, b = flora[lo]["output_tps"], flora[hi]["output_tps"]
        goals[f"flora_r1_tps_{hi}_over_{lo}_distinct"] = b / a if a and b else None
        goals["flora_r1_over_base"] = {d: v["output_tps"] / base_tps if base_tps and
                                       v["output_tps"] else None for d, v in flora.items()}
    cold = result.get("cold_start", {})
    if "flora-r1" in cold and "lora-r8" in cold:
        goals["cold_ttft_flora_r1_over_lora_r8"] = (
            cold["flora-r1"]["cold_p50_s"] / cold["lora-r8"]["cold_p50_s"])
    registered = [{"registered": r["registered"], "output_tps": _metric(r, "output_throughput"),
                   "rss_mib": r["rss_mib"], "register_s": r.get("register_s")}
                  for r in result.get("registered", [])]
    return {"base_output_tps": base_tps, "by_kind": table, "registered": registered,
            "cold_p50_s": {k: v["cold_p50_s"] for k, v in cold.items()},
            "warm_p50_s": {k: v["warm_p50_s"] for k, v in cold.items()}, "goals": goals}


def print_table(s: dict[str, Any]) -> None:
    print(f"\nbase (LoRA off): {s['base_output_tps'] or float('nan'):.1f} output tok/s")
    for kind, row in s["by_kind"].items():
        for d, v in sorted(row.items()):
            print(f"{kind:9s} D={d:4d}: {v['output_tps'] or float('nan'):8.1f} tok/s, "
                  f"TPOT p50 {v['tpot_p50_ms'] or float('nan'):.1f} ms, "
                  f"p99 {v['tpot_p99_ms'] or float('nan'):.1f} ms")
    for r in s["registered"]:
        print(f"registered {r['registered']:5d}: {r['output_tps'] or float('nan'):8.1f} tok/s, "
              f"RSS {r['rss_mib']:.0f} MiB")
    for k, v in s["cold_p50_s"].items():
        print(f"cold start {k}: TTFT p50 {v * 1e3:.0f} ms (warm {s['warm_p50_s'][k] * 1e3:.0f})")
    print("goals:", s["goals"])


def plot(result: dict[str, Any], png: str) -> str | None:
    plt = common.pyplot()
    if plt is None:
        return None
    s = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, row in s["by_kind"].items():
        ds = sorted(row)
        axes[0].plot(ds, [row[d]["output_tps"] for d in ds], marker="o", label=kind)
    if s["base_output_tps"]:
        axes[0].axhline(s["base_output_tps"], color="k", ls="--", label="base (LoRA off)")
    axes[0].set(xscale="log", xlabel="distinct adapters per step", ylabel="output tok/s")
    axes[0].legend()
    reg = s["registered"]
    if reg:
        ks = [r["registered"] for r in reg]
        axes[1].plot(ks, [r["output_tps"] for r in reg], marker="o", label="output tok/s")
        twin = axes[1].twinx()
        twin.plot(ks, [r["rss_mib"] for r in reg], marker="s", color="C3", label="RSS MiB")
        twin.set_ylabel("server RSS (MiB)")
        axes[1].set(xscale="log", xlabel="FLoRA r=1 adapters registered", ylabel="output tok/s")
    for i, v in enumerate(result.get("cold_start", {}).values()):
        axes[2].bar([i - 0.2], [v["cold_p50_s"] * 1e3], width=0.4, color="C1")
        axes[2].bar([i + 0.2], [v["warm_p50_s"] * 1e3], width=0.4, color="C2")
    axes[2].set_xticks(range(len(result.get("cold_start", {}))), list(result.get("cold_start", {})))
    axes[2].set(ylabel="TTFT p50 (ms): cold (orange), warm (green)")
    fig.suptitle(f"{result['tag']}: {result['machine'].get('cpu_model')}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


if __name__ == "__main__":
    main()
