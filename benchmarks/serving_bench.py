"""Serving benchmark: base vs LoRA vs FLoRA vs mixed, measured by vLLM's own serving benchmark
against real vLLM OpenAI servers that this script starts.

Why: the question users ask is "what does FLoRA cost me in tokens per second against plain
LoRA and against no adapter at all, at my adapter count and rank". vLLM's benchmark
(`vllm.benchmarks.serve`, the code behind `vllm bench serve`) answers it with the metrics
everyone quotes (output tok/s, TTFT, TPOT, ITL), so the numbers compare with any other vLLM run.

Modes, per adapter count N and rank r (each request picks one of the mode's adapters at random,
seeded by --seed, through the benchmark's `--lora-modules` / `--lora-assignment random`):

    base   the model alone, on a server started WITHOUT LoRA support (the true vLLM baseline)
    lora   N distinct PEFT LoRA adapters of rank r   (flora_vllm.testing.tiny.make_lora_adapter)
    flora  N distinct FLoRA adapters of rank r       (flora_vllm.testing.tiny.make_flora_adapter)
    mixed  N//2 FLoRA + (N - N//2) LoRA adapters of rank r (N >= 2)
    dora   N distinct PEFT DoRA adapters of rank r   (flora_vllm.testing.tiny.make_dora_adapter):
           beside LoRA of the same rank (a DoRA token is a LoRA token plus an output scaling)
    ia3    N distinct PEFT IA3 adapters (make_ia3_adapter; LLaMA: k_proj, v_proj, down_proj,
           down_proj feed-forward, PEFT's default), no rank: once per N, on the server of the
           smallest rank group, beside the plain server (`base`)

Each server gets `--max-lora-rank` = the smallest value vLLM allows >= r (1, 8, 16, 32, ...:
vLLM pads LoRA adapters to it, FLoRA work follows each adapter's own rank), `--max-loras` =
min(N, --max-loras-cap), `--max-cpu-loras` = every adapter it hosts (none is evicted from RAM).
Runs that share (N, --max-lora-rank) share one server (ranks 2, 4, 8 all run under 8): the
server config of each run is the same as with one server per run, minus the restarts; each
run's adapters are warmed up (one request each) before it is measured. `--flora-execution`
reaches the FLoRA layers as the env var FLORA_EXECUTION.

The default model is a random LLaMA of about 120M parameters (hidden 1024, 16 heads of 64,
8 layers, MLP 2816: the proportions of Llama-2-7B) built locally with flora_vllm.testing.tiny. Its
vocabulary is 8192: a 32000-row LM head would weigh a third of a model this small (2% of
Llama-2-7B), and the tiny tokenizer learns only 428 tokens from its few lines whatever size it
is asked for (prompts use those; ids above them that the model emits detokenize to nothing,
and vLLM counts output tokens itself). `--arch starcoder` is GPTBigCode (multi-query attention,
MLP 4x hidden, ~119M). Models and adapters are cached under --workdir (git-ignored).

Every server runs with `--no-enable-prefix-caching` (random prompts share no prefix, and a
prompt meeting the same adapter again in a later run must not be a cache hit), and each server
first serves one unmeasured wave shaped like the runs, so its one-time costs land on no run.

Output: <results-dir>/<tag>.json (machine, versions, model, every flag, per run vLLM's metrics:
request/output throughput, TTFT/TPOT/ITL/E2EL mean, median, p90, p99), vLLM's own result file
per run under <tag>/raw/, server logs under <tag>/logs/, the plot <tag>.png, and a printed
table of FLoRA/base and FLoRA/LoRA output tok/s per N and rank with the inflection rank (the
smallest rank where FLoRA's output tok/s falls below LoRA's).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common  # noqa: E402
from flora_vllm.serving.server import ServerProcess, lora_modules_args  # noqa: E402
from flora_vllm.testing import tiny  # noqa: E402

# ---- Config ------------------------------------------------------------------------------------
MODES = ("base", "base-lora", "lora", "flora", "mixed", "dora", "ia3")
RANKS = (1, 2, 4, 8, 16)
NUM_ADAPTERS = (1, 8, 32, 64)
MAX_LORAS_CAP = 32
SEED = 0
WORKDIR = os.path.join(REPO_ROOT, "benchmarks", ".work")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

MODEL_SPECS: dict[str, tiny.TinySpec] = {
    # ~120M parameters: 8 x 12.9M in the layers + 2 x 8.4M embedding / LM head.
    "llama": tiny.TinySpec(
        hidden=1024, heads=16, kv_heads=16, layers=8, intermediate=2816, vocab=8192,
        max_positions=4096, init_std=0.02,
    ),
    # ~119M parameters: StarCoder's shape (multi-query, MLP 4x hidden), tied LM head.
    "starcoder": tiny.TinySpec(
        hidden=1024, heads=16, kv_heads=1, layers=10, intermediate=4096, vocab=8192,
        max_positions=4096, init_std=0.02,
    ),
}
TARGETS = {"llama": tiny.LLAMA_TARGETS, "starcoder": tiny.STARCODER_TARGETS}
ADAPTER_SEED = {  # + 1000·rank + index: distinct adapters
    "flora": 100_000, "lora": 200_000, "dora": 300_000, "ia3": 400_000,
}
# IA3 (target_modules, feedforward_modules): PEFT's own defaults for LLaMA and GPTBigCode
# (`c_attn` scales its output and its bias).
IA3_TARGETS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "starcoder": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}
RANKED_MODES = ("lora", "flora", "mixed", "dora")  # one run per rank (ia3 has no rank)


@dataclass(frozen=True)
class Workload:
    """Requests of one benchmark run (vLLM's random dataset: no download)."""

    name: str
    input_len: int  # prompt tokens per request
    output_len: int  # generated tokens per request (EOS ignored)
    num_prompts: int
    max_concurrency: int  # requests in flight at once


WORKLOADS: dict[str, Workload] = {
    "default": Workload("default", 128, 128, 64, 32),
    "decode-heavy": Workload("decode-heavy", 16, 256, 64, 32),  # TPOT-bound: many steps
    "prefill-heavy": Workload("prefill-heavy", 1024, 8, 64, 32),  # TTFT-bound: big matmuls
}


@dataclass
class Run:
    """One measured benchmark run."""

    mode: str
    rank: int | None  # None for base and ia3
    num_adapters: int  # 0 for base
    adapters: list[str]  # served names requests pick from; empty: the base model

    @property
    def id(self) -> str:
        if self.mode == "base":
            return "base"
        if self.mode in ("base-lora", "ia3"):
            return f"{self.mode}-n{self.num_adapters}"
        return f"{self.mode}-r{self.rank}-n{self.num_adapters}"


@dataclass
class ServerPlan:
    """One vLLM server and the runs measured against it."""

    key: str
    max_lora_rank: int | None  # None: LoRA support off (base)
    max_loras: int | None
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> folder
    runs: list[Run] = field(default_factory=list)


# ---- Models and adapters (built once, cached under --workdir) ----------------------------------
def _build_atomic(path: str, build: Any) -> str:
    """Build into a temporary sibling folder, then rename: an interrupted build leaves no
    half-written folder that a later run would take for a cached one."""
    if os.path.isdir(path):
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    os.replace(tmp, path)
    return path


def ensure_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    ignore = os.path.join(workdir, ".gitignore")
    if not os.path.exists(ignore):  # the cache never shows up in `git status`
        with open(ignore, "w") as f:
            f.write("# generated models and adapters of benchmarks/serving_bench.py\n*\n")


def model_key(arch: str, spec: tiny.TinySpec, seed: int) -> str:
    return (
        f"{arch}-h{spec.hidden}-a{spec.heads}-kv{spec.kv_heads}-l{spec.layers}"
        f"-i{spec.intermediate}-v{spec.vocab}-p{spec.max_positions}-std{spec.init_std}-s{seed}"
    )


def ensure_model(workdir: str, arch: str, spec: tiny.TinySpec, seed: int) -> str:
    path = os.path.join(workdir, "models", model_key(arch, spec, seed))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if arch == "llama":
        return _build_atomic(path, lambda p: tiny.build_llama(p, spec, seed))
    return _build_atomic(path, lambda p: tiny.build_starcoder(p, spec, seed, multi_query=True))


def ensure_adapter(
    workdir: str, model_dir: str, arch: str, kind: str, rank: int | None, index: int
) -> str:
    """The cached adapter `adapter_name(kind, rank, index)` of the model (made once): FLoRA by
    this project's writer, LoRA, DoRA and IA3 by PEFT itself."""
    name = adapter_name(kind, rank, index)
    path = os.path.join(workdir, "adapters", os.path.basename(model_dir), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    seed = ADAPTER_SEED[kind] + 1000 * (rank or 0) + index
    targets = TARGETS[arch]
    if kind == "ia3":
        ia3_targets, feedforward = IA3_TARGETS[arch]
        return _build_atomic(
            path, lambda p: tiny.make_ia3_adapter(model_dir, p, ia3_targets, feedforward, seed)
        )
    make = {"flora": tiny.make_flora_adapter, "lora": tiny.make_lora_adapter,
            "dora": tiny.make_dora_adapter}[kind]
    assert rank is not None, kind
    return _build_atomic(path, lambda p: make(model_dir, p, rank, targets, seed))


def adapter_name(kind: str, rank: int | None, index: int) -> str:
    """Served name of one benchmark adapter: `flora-r4-0`, `dora-r8-3`, `ia3-2` (no rank)."""
    return f"{kind}-{index}" if rank is None else f"{kind}-r{rank}-{index}"


def parse_adapter_name(name: str) -> tuple[str, int | None, int]:
    """(kind, rank or None, index) of an `adapter_name`."""
    parts = name.split("-")
    if len(parts) == 2:
        return parts[0], None, int(parts[1])
    kind, r, i = parts
    return kind, int(r[1:]), int(i)


def count_params(model_dir: str) -> int:
    """Parameters in the model's safetensors files (headers only, no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
    return total


# ---- The plan ----------------------------------------------------------------------------------
def plan_servers(
    modes: list[str], ranks: list[int], counts: list[int], cap: int
) -> tuple[list[ServerPlan], list[dict[str, Any]]]:
    """Servers in run order and the runs that cannot exist (mixed with N < 2). IA3 runs once per
    N, on that N's first (smallest rank) server: its rank-1 vectors fit any of them."""
    plans: list[ServerPlan] = []
    skipped: list[dict[str, Any]] = []
    if "base" in modes:
        plans.append(ServerPlan("base", None, None, runs=[Run("base", None, 0, [])]))
    for n in counts:
        groups: dict[int, list[int]] = {}
        for r in sorted(ranks):
            groups.setdefault(common.vllm_max_lora_rank(r), []).append(r)
        for max_rank, group_ranks in groups.items():
            plan = ServerPlan(f"n{n}-maxrank{max_rank}", max_rank, min(n, cap))
            first_of_n = not any(p.key.startswith(f"n{n}-") for p in plans)
            if "base-lora" in modes and first_of_n:
                # base requests on the adapter-enabled server: what adapter mode costs them
                plan.runs.append(Run("base-lora", None, n, []))
            if "ia3" in modes and first_of_n:
                plan.runs.append(Run("ia3", None, n, [adapter_name("ia3", None, i)
                                                      for i in range(n)]))
            for r in group_ranks:
                for mode in RANKED_MODES:
                    if mode not in modes:
                        continue
                    if mode == "mixed" and n < 2:
                        skipped.append({"mode": mode, "rank": r, "num_adapters": n,
                                        "reason": "mixed needs N >= 2"})
                        continue
                    if mode == "dora":
                        names = [adapter_name("dora", r, i) for i in range(n)]
                    else:
                        n_flora = {"lora": 0, "flora": n, "mixed": n // 2}[mode]
                        names = [adapter_name("flora", r, i) for i in range(n_flora)]
                        names += [adapter_name("lora", r, i) for i in range(n - n_flora)]
                    plan.runs.append(Run(mode, r, n, names))
            if plan.runs:
                plans.append(plan)
    return plans, skipped


# ---- Serving and measuring ---------------------------------------------------------------------
def post_json(url: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code}: {e.read().decode(errors='replace')}") from e


def warm_up(url: str, names: list[str], workers: int = 4) -> float:
    """One short request per adapter (or the base model): loads every adapter into the server
    before the clock runs, so the measured run pays no first-use loading."""
    t0 = time.monotonic()

    def one(name: str) -> None:
        post_json(
            url + "/v1/completions",
            {"model": name, "prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0},
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as ex:
        list(ex.map(one, names))
    return time.monotonic() - t0


def vllm_bench(
    url: str,
    model_dir: str,
    run: Run,
    wl: Workload,
    args: argparse.Namespace,
    raw_dir: str | None,
    seed: int,
    assignment: str = "random",
    label: str | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """vLLM's serving benchmark, in this process, against `url`; its result dict (also saved
    as <raw_dir>/<label>.json unless raw_dir is None; label: the run's id by default).
    `assignment`: each request's adapter drawn at random, or `round-robin` (N concurrent
    requests over N adapters: one each). `extra`: more flags of vLLM's benchmark."""
    label = label or run.id
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend", "openai",
        "--base-url", url,
        "--endpoint", "/v1/completions",
        "--model", "base",  # the served name: requests and /tokenize use it
        "--served-model-name", "base",
        "--tokenizer", model_dir,
        "--dataset-name", "random",
        "--input-len", str(wl.input_len),
        "--output-len", str(wl.output_len),
        "--num-prompts", str(wl.num_prompts),
        "--max-concurrency", str(wl.max_concurrency),
        "--request-rate", str(args.request_rate),
        "--seed", str(seed),
        "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--label", label,
        "--disable-tqdm",
        *(extra or []),
    ]  # fmt: skip
    if raw_dir is not None:
        argv += ["--save-result", "--result-dir", raw_dir, "--result-filename", f"{label}.json"]
    if run.adapters:
        argv += ["--lora-modules", *run.adapters, "--lora-assignment", assignment]
    return bench_main(parser.parse_args(argv))


def server_args(plan: ServerPlan, args: argparse.Namespace, max_model_len: int) -> list[str]:
    out = [
        "--served-model-name", "base",
        "--dtype", args.dtype,
        "--max-model-len", str(max_model_len),
        "--seed", str(args.seed),
        # Random prompts share no prefix; without this a prompt that meets the same adapter
        # again in a later run on this server would be a cache hit.
        "--no-enable-prefix-caching",
    ]  # fmt: skip
    if plan.max_lora_rank is None:
        out += ["--no-enable-lora"]
    else:
        out += [
            "--enable-lora",
            "--max-lora-rank", str(plan.max_lora_rank),
            "--max-loras", str(plan.max_loras),
            "--max-cpu-loras", str(max(len(plan.adapters), plan.max_loras or 1)),
            *lora_modules_args(plan.adapters),
        ]  # fmt: skip
    return out + list(args.server_arg or [])


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "FLORA_EXECUTION": args.flora_execution}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    return env


SCALAR = (int, float, str, bool, type(None))


def summarize(runs: list[dict[str, Any]], ranks: list[int], counts: list[int]) -> dict[str, Any]:
    """Per N: output tok/s and median TPOT per mode and rank, FLoRA/base and FLoRA/LoRA (and
    mixed/base, DoRA/LoRA at the same rank, IA3/base), and the inflection rank (smallest rank
    where FLoRA tok/s < LoRA's)."""

    def metric(mode: str, rank: int | None, n: int, key: str) -> float | None:
        for r in runs:
            if r["mode"] == mode and r["rank"] == rank and r["num_adapters"] == n:
                return (r.get("metrics") or {}).get(key)
        return None

    base_tps = metric("base", None, 0, "output_throughput")
    out: dict[str, Any] = {}
    for n in counts:
        base_lora_tps = metric("base-lora", None, n, "output_throughput")
        ia3_tps = metric("ia3", None, n, "output_throughput")
        by_rank: dict[str, Any] = {}
        for r in ranks:
            tps = {m: metric(m, r, n, "output_throughput") for m in RANKED_MODES}
            tpot = {m: metric(m, r, n, "median_tpot_ms") for m in RANKED_MODES}
            by_rank[str(r)] = {
                "output_tok_s": {"base": base_tps, **tps},
                "median_tpot_ms": {"base": metric("base", None, 0, "median_tpot_ms"), **tpot},
                "flora_over_base": _ratio(tps["flora"], base_tps),
                "lora_over_base": _ratio(tps["lora"], base_tps),
                "flora_over_lora": _ratio(tps["flora"], tps["lora"]),
                "mixed_over_base": _ratio(tps["mixed"], base_tps),
                "dora_over_lora": _ratio(tps["dora"], tps["lora"]),
                "dora_over_base": _ratio(tps["dora"], base_tps),
            }
        flora = {r: by_rank[str(r)]["output_tok_s"]["flora"] for r in ranks}
        lora = {r: by_rank[str(r)]["output_tok_s"]["lora"] for r in ranks}
        out[str(n)] = {
            "inflection_rank": common.inflection_rank(ranks, flora, lora),
            # the reference line: the plain server with LoRA off
            "base_on_adapter_server_over_plain": _ratio(base_lora_tps, base_tps),
            "base_on_adapter_server_tok_s": base_lora_tps,
            # IA3 (rank-free) beside the plain server and base requests on the adapter server
            "ia3_tok_s": ia3_tps,
            "ia3_median_tpot_ms": metric("ia3", None, n, "median_tpot_ms"),
            "ia3_over_base": _ratio(ia3_tps, base_tps),
            "ia3_over_base_on_adapter_server": _ratio(ia3_tps, base_lora_tps),
            "by_rank": by_rank,
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_table(summary: dict[str, Any]) -> None:
    def f(v: float | None, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        return format(v, fmt) if v is not None else "-".rjust(width)

    print("\nOutput tok/s ratios (same run set)")
    print(f"{'N':>4} {'rank':>4} {'base':>8} {'lora':>8} {'flora':>8} {'mixed':>8} "
          f"{'dora':>8} {'FLoRA/base':>10} {'FLoRA/LoRA':>10} {'DoRA/LoRA':>10}")
    for n, s in summary.items():
        for r, row in s["by_rank"].items():
            t = row["output_tok_s"]
            print(
                f"{n:>4} {r:>4} {f(t['base'], '8.1f')} {f(t['lora'], '8.1f')} "
                f"{f(t['flora'], '8.1f')} {f(t['mixed'], '8.1f')} {f(t['dora'], '8.1f')} "
                f"{f(row['flora_over_base'], '10.3f')} {f(row['flora_over_lora'], '10.3f')} "
                f"{f(row['dora_over_lora'], '10.3f')}"
            )
        if s.get("ia3_tok_s") is not None:
            print(f"{n:>4} IA3 (no rank): {s['ia3_tok_s']:.1f} tok/s, "
                  f"IA3/base {f(s['ia3_over_base'], '5.3f')}")
        print(f"{n:>4} inflection rank (FLoRA tok/s < LoRA's): {s['inflection_rank'] or 'none'}")
        if s.get("base_on_adapter_server_over_plain") is not None:
            print(f"{n:>4} base requests on the adapter-enabled server / plain server: "
                  f"{s['base_on_adapter_server_over_plain']:.3f}")


# ---- Driver ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="llama", choices=list(MODEL_SPECS))
    ap.add_argument("--tiny", action="store_true",
                    help="testing.tiny's default TinySpec (hidden 256): tests, seconds to start")
    ap.add_argument("--model", help="an existing HF model folder of --arch instead of a random one")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    ap.add_argument("--num-adapters", nargs="+", type=int, default=list(NUM_ADAPTERS))
    ap.add_argument("--max-loras-cap", type=int, default=MAX_LORAS_CAP,
                    help="--max-loras = min(N, this)")
    ap.add_argument("--flora-execution", default="auto",
                    choices=["auto", "expanded", "merged", "fused"],
                    help="FLORA_EXECUTION of the server (how FLoRA layers run)")
    ap.add_argument("--workload", default="default", choices=list(WORKLOADS),
                    help="; ".join(f"{w.name}: in {w.input_len}, out {w.output_len}, "
                                   f"{w.num_prompts} prompts, concurrency {w.max_concurrency}"
                                   for w in WORKLOADS.values()))
    ap.add_argument("--num-prompts", type=int, help="overrides the workload's")
    ap.add_argument("--input-len", type=int, help="overrides the workload's")
    ap.add_argument("--output-len", type=int, help="overrides the workload's")
    ap.add_argument("--max-concurrency", type=int, help="overrides the workload's")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests/s (Poisson); inf sends all at once (default)")
    ap.add_argument("--seed", type=int, default=SEED, help="prompts, adapter choice, model")
    ap.add_argument("--dtype", default="auto", help="server --dtype; auto: bfloat16 on CUDA, "
                    "float32 on the CPU")
    ap.add_argument("--kv-cache-gib", type=int, default=4,
                    help="VLLM_CPU_KVCACHE_SPACE of the server (CPU), unless already set")
    ap.add_argument("--server-arg", action="append", metavar="--FLAG=VALUE",
                    help="extra vLLM server flag (repeatable); write it with '=', as in "
                    "--server-arg=--max-num-seqs=64")
    ap.add_argument("--server-timeout", type=float, default=1200.0, help="seconds to start")
    ap.add_argument("--workdir", default=WORKDIR, help="cache of models and adapters")
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--tag", help="result set name (default serving_<arch>_<workload>_<time>)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.dtype == "auto":
        import torch

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    for r in args.ranks:
        common.vllm_max_lora_rank(r)  # fails early on a rank vLLM cannot hold
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    wl0 = WORKLOADS[args.workload]
    wl = Workload(
        wl0.name,
        args.input_len or wl0.input_len,
        args.output_len or wl0.output_len,
        args.num_prompts or wl0.num_prompts,
        args.max_concurrency or wl0.max_concurrency,
    )
    spec = tiny.TinySpec() if args.tiny else MODEL_SPECS[args.arch]
    max_model_len = max(256, wl.input_len + wl.output_len + 64)
    if not args.model and max_model_len > spec.max_positions:
        raise SystemExit(f"input {wl.input_len} + output {wl.output_len} needs --max-model-len "
                         f"{max_model_len} > the model's {spec.max_positions} positions")
    arch = args.arch + ("-tiny" if args.tiny else "")
    tag = args.tag or f"serving_{arch}_{wl.name}_{common.now_stamp()}"
    out_json = os.path.join(args.results_dir, f"{tag}.json")
    raw_dir = os.path.join(args.results_dir, tag, "raw")
    log_dir = os.path.join(args.results_dir, tag, "logs")
    os.makedirs(raw_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benchmark's tokenizer is a local folder

    # Everything the runs need, built (or found in the cache) before any server starts.
    ensure_workdir(args.workdir)
    targets = TARGETS[args.arch]
    t0 = time.monotonic()
    if "ia3" in args.modes and args.arch not in IA3_TARGETS:
        raise SystemExit(f"no IA3 targets for --arch {args.arch}")
    model_dir = args.model or ensure_model(args.workdir, args.arch, spec, args.seed)
    plans, skipped = plan_servers(args.modes, args.ranks, args.num_adapters, args.max_loras_cap)
    for plan in plans:
        for run in plan.runs:
            for name in run.adapters:
                if name not in plan.adapters:
                    kind, r, i = parse_adapter_name(name)
                    plan.adapters[name] = ensure_adapter(
                        args.workdir, model_dir, args.arch, kind, r, i
                    )
    prep_s = time.monotonic() - t0
    print(f"model and adapters ready in {prep_s:.0f}s: {model_dir}")

    result: dict[str, Any] = {
        "kind": "serving",
        "tag": tag,
        "created": common.now_stamp(),
        "command": [sys.executable, *sys.argv],
        "machine": common.machine_info(),
        "versions": common.versions(),
        "git": common.git_revision(REPO_ROOT),
        "settings": {
            **vars(args),
            "max_model_len": max_model_len,
            "env": server_env(args),
            "inherited_env": {  # what the servers also see from this shell
                k: v for k, v in os.environ.items() if k.startswith(("FLORA_", "VLLM_"))
            },
            "prepare_s": prep_s,
        },
        "model": {
            "arch": args.arch,
            "path": model_dir,
            "spec": None if args.model else asdict(spec),
            "params_m": round(count_params(model_dir) / 1e6, 1),
            "targets": list(targets),
            "ia3_targets": {"target_modules": list(IA3_TARGETS[args.arch][0]),
                            "feedforward_modules": list(IA3_TARGETS[args.arch][1])}
            if args.arch in IA3_TARGETS else None,
        },
        "workload": {**asdict(wl), "request_rate": args.request_rate, "dataset": "random"},
        "servers": [],
        "runs": [],
        "skipped": skipped,
    }

    def save() -> None:
        result["summary"] = summarize(result["runs"], args.ranks, args.num_adapters)
        common.write_json(out_json, result)

    for plan in plans:
        srv_args = server_args(plan, args, max_model_len)
        record: dict[str, Any] = {
            "key": plan.key, "args": srv_args, "env": server_env(args),
            "log": os.path.join(log_dir, f"{plan.key}.log"), "startup_s": None, "error": None,
        }  # fmt: skip
        result["servers"].append(record)
        server = ServerProcess(model_dir, srv_args, server_env(args), log_path=record["log"])
        t0 = time.monotonic()
        try:
            server.start(timeout=args.server_timeout)
        except Exception as e:  # record, and go on with the other servers
            record["error"] = repr(e)
            print(f"server {plan.key} failed to start: {e}")
            for run in plan.runs:
                result["runs"].append({**_run_record(run, plan), "error": "server failed"})
            save()
            continue
        record["startup_s"] = time.monotonic() - t0
        print(f"server {plan.key} up in {record['startup_s']:.0f}s")
        try:
            record["warm_wave_s"] = warm_wave(server, model_dir, plan.runs[0], wl, args)
            for run in plan.runs:
                result["runs"].append(_measure(server, model_dir, run, plan, wl, args, raw_dir))
                save()
        finally:
            server.stop()
    save()
    print_table(result["summary"])
    failed = [r["id"] for r in result["runs"] if r.get("error")]
    if failed:
        print(f"\n{len(failed)} run(s) failed or incomplete: {', '.join(failed)} (see 'error')")
    print(f"\nwrote {out_json}")
    if not args.no_plot:
        from benchmarks import plot

        png = plot.plot_serving(result, out_json.removesuffix(".json") + ".png")
        if png:
            print(f"wrote {png}")
    return out_json


def _run_record(run: Run, plan: ServerPlan) -> dict[str, Any]:
    return {
        "id": run.id,
        "mode": run.mode,
        "rank": run.rank,
        "num_adapters": run.num_adapters,
        "adapters": run.adapters,
        "server": plan.key,
        "max_lora_rank": plan.max_lora_rank,
        "max_loras": plan.max_loras,
    }


def warm_wave(
    server: ServerProcess, model_dir: str, run: Run, wl: Workload, args: argparse.Namespace
) -> float | None:
    """One unmeasured wave shaped like the runs (full concurrency, full prompts, 4 tokens out)
    on a fresh server: the first batch of a server pays one-time costs that would otherwise
    land on whichever run comes first."""
    wave = Workload(
        "warm-wave", wl.input_len, min(4, wl.output_len),
        min(wl.num_prompts, wl.max_concurrency), wl.max_concurrency,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        warm_up(server.url, run.adapters or ["base"])
        vllm_bench(server.url, model_dir, run, wave, args, None, args.seed + 1)
    except Exception as e:  # the measured runs will fail (and say why) if this did
        print(f"warm-up wave on {server.url} failed: {e!r}")
        return None
    return time.monotonic() - t0


def _measure(
    server: ServerProcess,
    model_dir: str,
    run: Run,
    plan: ServerPlan,
    wl: Workload,
    args: argparse.Namespace,
    raw_dir: str,
) -> dict[str, Any]:
    rec = {**_run_record(run, plan), "metrics": None, "error": None}
    rec["load_average_1m"] = os.getloadavg()[0]  # > cores: something else shared the machine
    print(f"\n=== {run.id} on server {plan.key} ===")
    try:
        rec["warmup_s"] = warm_up(server.url, run.adapters or ["base"])
        t0 = time.monotonic()
        res = vllm_bench(server.url, model_dir, run, wl, args, raw_dir, args.seed)
        rec["wall_s"] = time.monotonic() - t0
        rec["metrics"] = {k: v for k, v in res.items() if isinstance(v, SCALAR)}
        rec["raw_result"] = os.path.join(raw_dir, f"{run.id}.json")
        if res.get("failed") or res.get("completed") != wl.num_prompts:
            rec["error"] = f"{res.get('failed')} failed, {res.get('completed')} completed"
            print(f"WARNING {run.id}: {rec['error']} (see {server.log_path})")
    except Exception as e:  # one failed run must not lose the sweep
        rec["error"] = repr(e)
        print(f"run {run.id} failed: {e!r}")
    return rec


if __name__ == "__main__":
    path = main()
    with open(path) as f:
        sys.exit(1 if any(r.get("error") for r in json.load(f)["runs"]) else 0)
