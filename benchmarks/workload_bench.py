"""Workloads as the multi-adapter serving papers publish them: adapter popularity (Punica) and
request arrivals with a latency SLO (S-LoRA), for base vs LoRA vs FLoRA, by vLLM's own serving
benchmark against real servers that this script starts (the machinery of `serving_bench.py`).

Why: a closed loop of equal requests to uniformly chosen adapters (serving_bench) is one point
of the space users live in. Punica (Chen et al., MLSys 2024) measures four popularity patterns,
S-LoRA (Sheng et al., MLSys 2024) open-loop arrivals and the share of requests that meet a
first-token SLO; FLoRA's claim (one shared GEMM whatever the mix) should hold across both.

Popularity (which of the N adapters each request names):
    distinct   every request its own adapter (round-robin over N = --num-prompts adapters)
    uniform    drawn uniformly from N
    skewed     Zipf: adapter k (1..N) drawn with weight k^-alpha (--zipf-alpha, Punica's 1.5)
    identical  all requests name one adapter
Arrivals (vLLM's benchmark, `--request-rate` with `--burstiness`):
    poisson    exponential gaps at --request-rate (burstiness 1)
    gamma      Gamma gaps at the same mean rate, burstiness --gamma-burstiness (0.25: a
               coefficient of variation of 2, S-LoRA's bursty traces)

Modes: `base` on a server started without LoRA (the plain vLLM reference line; popularity does
not apply, one run per arrival process), `lora` and `flora` of rank --rank on one
adapter-enabled server that hosts both kinds (`--max-loras` = min(N, --max-loras-cap)).
SLO attainment: the share of requests (failed ones count as missed) whose TTFT is at most
--slo-ttft-ms, from the per-request TTFTs vLLM's benchmark returns. Output: <tag>.json (machine,
versions, settings, per run vLLM's metrics and the attainment), vLLM's result per run under
<tag>/raw/, server logs under <tag>/logs/, the plot <tag>.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common, serving_bench  # noqa: E402
from benchmarks.serving_bench import SCALAR, Run, ServerPlan, Workload  # noqa: E402
from flora_vllm.serving.server import ServerProcess  # noqa: E402
from flora_vllm.testing import tiny  # noqa: E402

POPULARITY = ("distinct", "uniform", "skewed", "identical")
ARRIVALS = ("poisson", "gamma")


def zipf_names(names: list[str], alpha: float, resolution: int = 4096) -> list[str]:
    """`names` repeated in proportion to k^-alpha (k = 1..N): drawing uniformly from the list
    (vLLM's `--lora-assignment random`) draws adapter k with Zipf weight. Every adapter keeps at
    least one entry; `resolution` entries in all, about."""
    weights = [(k + 1) ** -alpha for k in range(len(names))]
    total = sum(weights)
    return [n for n, w in zip(names, weights, strict=True)
            for _ in range(max(1, round(resolution * w / total)))]


def popularity_plan(pattern: str, names: list[str], alpha: float) -> tuple[list[str], str]:
    """(the `--lora-modules` list, the `--lora-assignment`) that give the pattern."""
    if pattern == "distinct":
        return names, "round-robin"
    if pattern == "uniform":
        return names, "random"
    if pattern == "skewed":
        return zipf_names(names, alpha), "random"
    if pattern == "identical":
        return names[:1], "random"
    raise ValueError(pattern)


def slo_attainment(result: dict[str, Any], slo_ms: float, num_prompts: int) -> float | None:
    """Share of the run's requests whose first token came within slo_ms; a failed request (an
    error, or no TTFT) counts as a miss."""
    ttfts, errors = result.get("ttfts"), result.get("errors") or []
    if ttfts is None:
        return None
    ok = sum(1 for i, t in enumerate(ttfts)
             if t and t * 1000 <= slo_ms and not (i < len(errors) and errors[i]))
    return ok / num_prompts


def bench(url: str, model_dir: str, label: str, adapters: list[str], assignment: str,
          arrival: str, wl: Workload, args: argparse.Namespace, raw_dir: str | None,
          ) -> dict[str, Any]:
    """vLLM's serving benchmark with this run's popularity and arrival process."""
    burst = 1.0 if arrival == "poisson" else args.gamma_burstiness
    return serving_bench.vllm_bench(
        url, model_dir, Run("workload", None, len(set(adapters)), adapters), wl, args, raw_dir,
        args.seed, assignment, label=label,
        extra=["--burstiness", str(burst), "--save-detailed"],  # detailed: per-request TTFTs
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="llama", choices=list(serving_bench.MODEL_SPECS))
    ap.add_argument("--tiny", action="store_true", help="testing.tiny's small model: tests")
    ap.add_argument("--model", help="an existing HF model folder of --arch instead of a random one")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["base", "lora", "flora"],
                    choices=["base", "lora", "flora"])
    ap.add_argument("--popularity", nargs="+", default=list(POPULARITY), choices=POPULARITY)
    ap.add_argument("--arrivals", nargs="+", default=list(ARRIVALS), choices=ARRIVALS)
    ap.add_argument("--num-adapters", type=int, default=64,
                    help="N per kind (distinct uses --num-prompts adapters: N must be >= it)")
    ap.add_argument("--max-loras-cap", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=1.5, help="mean requests/s")
    ap.add_argument("--gamma-burstiness", type=float, default=0.25)
    ap.add_argument("--zipf-alpha", type=float, default=1.5)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--seed", type=int, default=serving_bench.SEED)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-gib", type=int, default=4)
    ap.add_argument("--flora-execution", default="auto",
                    choices=["auto", "expanded", "merged", "fused"])
    ap.add_argument("--server-arg", action="append", metavar="--FLAG=VALUE")
    ap.add_argument("--server-timeout", type=float, default=1200.0)
    ap.add_argument("--workdir", default=serving_bench.WORKDIR)
    ap.add_argument("--results-dir", default=serving_bench.RESULTS_DIR)
    ap.add_argument("--tag")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if "distinct" in args.popularity and args.num_adapters < args.num_prompts:
        ap.error("distinct needs --num-adapters >= --num-prompts (one adapter per request)")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    wl = Workload("workload", args.input_len, args.output_len, args.num_prompts,
                  args.max_concurrency)
    spec = tiny.TinySpec() if args.tiny else serving_bench.MODEL_SPECS[args.arch]
    max_model_len = max(256, wl.input_len + wl.output_len + 64)
    tag = args.tag or f"workload_{args.arch}_{common.now_stamp()}"
    out_json = os.path.join(args.results_dir, f"{tag}.json")
    raw_dir, log_dir = (os.path.join(args.results_dir, tag, d) for d in ("raw", "logs"))
    os.makedirs(raw_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serving_bench.ensure_workdir(args.workdir)
    model_dir = args.model or serving_bench.ensure_model(args.workdir, args.arch, spec, args.seed)
    targets = serving_bench.TARGETS[args.arch]
    kinds = [m for m in args.modes if m != "base"]
    names = {k: [serving_bench.adapter_name(k, args.rank, i) for i in range(args.num_adapters)]
             for k in kinds}
    plans = []
    if "base" in args.modes:
        plans.append(ServerPlan("base", None, None))
    if kinds:
        plan = ServerPlan(f"adapters-r{args.rank}", common.vllm_max_lora_rank(args.rank),
                          min(args.num_adapters, args.max_loras_cap))
        for k in kinds:
            for i, name in enumerate(names[k]):
                plan.adapters[name] = serving_bench.ensure_adapter(
                    args.workdir, model_dir, args.arch, k, args.rank, i)
        plans.append(plan)
    result: dict[str, Any] = {
        "kind": "workload", "tag": tag, "created": common.now_stamp(),
        "command": [sys.executable, *sys.argv], "machine": common.machine_info(),
        "versions": common.versions(), "git": common.git_revision(REPO_ROOT),
        "settings": {**vars(args), "max_model_len": max_model_len},
        "model": {"arch": args.arch, "path": model_dir, "targets": list(targets)},
        "servers": [], "runs": [],
    }  # fmt: skip
    for plan in plans:
        srv_args = serving_bench.server_args(plan, args, max_model_len)
        log = os.path.join(log_dir, f"{plan.key}.log")
        result["servers"].append({"key": plan.key, "args": srv_args, "log": log})
        server = ServerProcess(model_dir, srv_args, serving_bench.server_env(args), log_path=log)
        server.start(timeout=args.server_timeout)
        try:
            first = names[kinds[0]] if plan.adapters else []
            serving_bench.warm_up(server.url, first or ["base"])
            for arrival in args.arrivals:
                for mode in (kinds if plan.adapters else ["base"]):
                    patterns = args.popularity if mode != "base" else ["-"]
                    for pattern in patterns:
                        result["runs"].append(_measure(server, model_dir, mode, pattern, arrival,
                                                       names.get(mode, []), wl, args, raw_dir))
                        common.write_json(out_json, result)
        finally:
            server.stop()
    result["summary"] = summarize(result["runs"])
    common.write_json(out_json, result)
    print_table(result["summary"])
    print(f"\nwrote {out_json}")
    if not args.no_plot:
        png = plot(result, out_json.removesuffix(".json") + ".png")
        if png:
            print(f"wrote {png}")
    return out_json


def _measure(server: ServerProcess, model_dir: str, mode: str, pattern: str, arrival: str,
             names: list[str], wl: Workload, args: argparse.Namespace, raw_dir: str,
             ) -> dict[str, Any]:
    """One run: this mode's adapters under one popularity pattern and arrival process."""
    label = f"{mode}-{pattern}-{arrival}" if mode != "base" else f"base-{arrival}"
    adapters, assignment = popularity_plan(pattern, names, args.zipf_alpha) if names else ([], "")
    rec: dict[str, Any] = {"id": label, "mode": mode, "popularity": pattern, "arrival": arrival,
                           "distinct_adapters": len(set(adapters)), "error": None,
                           "load_average_1m": os.getloadavg()[0]}
    print(f"\n=== {label} ===")
    try:
        serving_bench.warm_up(server.url, sorted(set(adapters)) or ["base"])
        t0 = time.monotonic()
        res = bench(server.url, model_dir, label, adapters, assignment, arrival, wl, args, raw_dir)
        rec["wall_s"] = time.monotonic() - t0
        rec["metrics"] = {k: v for k, v in res.items() if isinstance(v, SCALAR)}
        rec["slo_attainment"] = slo_attainment(res, args.slo_ttft_ms, wl.num_prompts)
        if res.get("failed") or res.get("completed") != wl.num_prompts:
            rec["error"] = f"{res.get('failed')} failed, {res.get('completed')} completed"
    except Exception as e:  # one failed run must not lose the set
        rec["error"] = repr(e)
        print(f"run {label} failed: {e!r}")
    return rec


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arrival and popularity: output tok/s, median TTFT, SLO attainment per mode, and
    FLoRA/LoRA, FLoRA/base, LoRA/base output tok/s."""
    def get(mode: str, pattern: str, arrival: str) -> dict[str, Any] | None:
        for r in runs:
            if (r["mode"], r["arrival"]) == (mode, arrival) and r["popularity"] in (pattern, "-"):
                return r
        return None

    out: dict[str, Any] = {}
    for arrival in sorted({r["arrival"] for r in runs}):
        for pattern in sorted({r["popularity"] for r in runs} - {"-"}):
            row: dict[str, Any] = {}
            for mode in ("base", "lora", "flora"):
                r = get(mode, pattern, arrival)
                m = (r or {}).get("metrics") or {}
                row[mode] = {"output_tok_s": m.get("output_throughput"),
                             "median_ttft_ms": m.get("median_ttft_ms"),
                             "slo_attainment": (r or {}).get("slo_attainment")}
            tps = {k: v["output_tok_s"] for k, v in row.items()}
            row["flora_over_lora"] = serving_bench._ratio(tps["flora"], tps["lora"])
            row["flora_over_base"] = serving_bench._ratio(tps["flora"], tps["base"])
            row["lora_over_base"] = serving_bench._ratio(tps["lora"], tps["base"])
            out[f"{arrival}/{pattern}"] = row
    return out


def print_table(summary: dict[str, Any]) -> None:
    def f(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    print(f"\n{'arrival/popularity':<20} {'mode':<6} {'tok/s':>8} {'TTFT ms':>8} {'SLO':>6}")
    for key, row in summary.items():
        for mode in ("base", "lora", "flora"):
            m = row[mode]
            print(f"{key:<20} {mode:<6} {f(m['output_tok_s'], '8.1f'):>8} "
                  f"{f(m['median_ttft_ms'], '8.0f'):>8} {f(m['slo_attainment'], '6.2f'):>6}")
        print(f"{'':<20} FLoRA/LoRA {f(row['flora_over_lora'], '.3f')}  "
              f"FLoRA/base {f(row['flora_over_base'], '.3f')}")


def plot(result: dict[str, Any], png: str) -> str | None:
    """Output tok/s and SLO attainment per workload, one bar per mode."""
    plt = common.pyplot()
    if plt is None:
        return None
    summary = result["summary"]
    keys = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(keys)), 4))
    width = 0.27
    for ax, metric, title in ((axes[0], "output_tok_s", "output tok/s"),
                              (axes[1], "slo_attainment", "TTFT SLO attainment")):
        for j, mode in enumerate(("base", "lora", "flora")):
            vals = [summary[k][mode][metric] or 0 for k in keys]
            ax.bar([i + (j - 1) * width for i in range(len(keys))], vals, width, label=mode)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend()
    s = result["settings"]
    fig.suptitle(f"{result['model']['arch']} r={s['rank']} N={s['num_adapters']} "
                 f"rate {s['request_rate']}/s, SLO TTFT {s['slo_ttft_ms']:.0f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
