"""Where a step's linear-layer time goes, per adapter kind, inside vLLM's engine (issue #25).

Each mode runs vLLM's own `LLM` engine in a fresh child process (engine core and worker in that
process, the plugin loaded as in a server) on the benchmark model: `plain` (LoRA off: the plain
server's engine), `base` (LoRA on, requests with no adapter), `flora` (N FLoRA r=1 adapters),
`ia3` (N PEFT IA3 adapters), `lora` (N vLLM LoRA r=1 adapters). The same prompts are generated
`--reps` times after a warm-up. Besides output tok/s, wall-clock seconds are summed per section
of every linear layer call, by wrapping the functions the FLoRA layers call (no profiler, a few
microseconds per call): vLLM's GEMMs (the layer's own packed one, a slice's), the per-token row
gathers, the input and output scaling passes, punica's LoRA on the output, and the whole layer.
(`plain` gives tok/s only: without LoRA, vLLM compiles its linear layers into its graph, where
no Python wrapper runs.)

    python benchmarks/engine_breakdown.py [--modes plain base flora ia3 lora] [--reps 2]

Output: benchmarks/results/<tag>.json (machine, versions, settings, per mode: tok/s per rep,
seconds per section per generated token) and <tag>.png.
Runs in: one child process per mode (no server; `VLLM_ENABLE_V1_MULTIPROCESSING=0`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common  # noqa: E402

MODES = ("plain", "base", "flora", "ia3", "lora")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
WORKDIR = os.path.join(REPO_ROOT, "benchmarks", ".work")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--num-adapters", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="testing.tiny's default model (tests)")
    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--tag", default="engine_breakdown")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Sections:
    """Seconds and calls per named section, summed by wrapped functions (eager calls only: under
    torch.compile's tracing a wrapper just calls through)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        import torch

        def timed(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(sections: Sections) -> None:
    """Wrap what the FLoRA layers call (before the engine builds them)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    import flora_vllm.layers.base as layer

    for name in ("_gather_rows", "_scaled", "_scale_out"):
        setattr(layer, name, sections.wrap(name.strip("_"), getattr(layer, name)))
    make_gemm, cpu_linear = layer.make_gemm, layer.cpu_linear
    layer.make_gemm = lambda w: sections.wrap("slice_gemm", make_gemm(w))

    def packed(base_layer: Any) -> Callable | None:
        fn = cpu_linear(base_layer)
        return None if fn is None else sections.wrap("packed_gemm", fn)

    layer.cpu_linear = packed
    layer.lora_on_output = sections.wrap("lora_on_output", layer.lora_on_output)
    mixin = layer.FLoRALinearMixin
    mixin.apply = sections.wrap("linear_layer", mixin.apply)  # the whole adapted layer
    mixin._apply_rank1_runs = sections.wrap("rank1_runs", mixin._apply_rank1_runs)
    UnquantizedLinearMethod.apply = sections.wrap("base_gemm", UnquantizedLinearMethod.apply)


def child(args: argparse.Namespace) -> None:
    """One mode's engine in this process; writes its record to --child-out."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from flora_vllm.serving.server import server_env

    for k, v in server_env().items():  # the CPU defaults `flora-vllm serve` uses
        os.environ.setdefault(k, v)
    from benchmarks.serving_bench import MODEL_SPECS, ensure_adapter, ensure_model
    from flora_vllm.testing import tiny

    sections = Sections()
    instrument(sections)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = tiny.TinySpec() if args.tiny else MODEL_SPECS["llama"]
    model_dir = ensure_model(args.workdir, "llama", spec, 0)
    n = args.num_adapters
    lora = {} if args.child == "plain" else {
        "enable_lora": True, "max_loras": n, "max_lora_rank": 1, "max_cpu_loras": n}
    llm = LLM(model_dir, dtype="float32", seed=0, max_num_seqs=args.max_num_seqs,
              max_model_len=max(256, args.input_len + args.output_len + 64),
              enable_prefix_caching=False, **lora)
    requests: list[Any] = [None] * args.prompts
    if args.child in ("flora", "ia3", "lora"):
        rank = None if args.child == "ia3" else 1
        paths = [ensure_adapter(args.workdir, model_dir, "llama", args.child, rank, i)
                 for i in range(n)]
        adapters = [LoRARequest(f"{args.child}-{i}", i + 1, p) for i, p in enumerate(paths)]
        requests = [adapters[i % n] for i in range(args.prompts)]
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, spec.vocab - 10)
                                              for _ in range(args.input_len)])
               for _ in range(args.prompts)]
    sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), lora_request=requests,
                 use_tqdm=False)  # loads every adapter, warms every shape
    sections.clear()
    tok_s, made = [], 0
    for _ in range(args.reps):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sampling, lora_request=requests, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        made_now = sum(len(o.outputs[0].token_ids) for o in outs)
        if made_now != args.prompts * args.output_len:
            raise RuntimeError(f"{args.child}: {made_now} tokens made")
        made += made_now
        tok_s.append(made_now / elapsed)
        print(f"{args.child}: {tok_s[-1]:.1f} tok/s", flush=True)
    record = {
        "tok_s": tok_s,
        "tokens": made,
        "us_per_token": {k: v / made * 1e6 for k, v in sections.seconds.items()},
        "calls": dict(sections.calls),
    }
    with open(args.child_out, "w") as f:
        json.dump(record, f)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.child:
        child(args)
        return ""
    modes: dict[str, Any] = {}
    for mode in args.modes:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]),
                   "--child", mode, "--child-out", out.name]
            subprocess.run(cmd, check=True)
            with open(out.name) as f:
                modes[mode] = json.load(f)
    ref = statistics.median(modes["plain"]["tok_s"]) if "plain" in modes else None
    summary = {}
    for mode, rec in modes.items():
        median = statistics.median(rec["tok_s"])
        summary[mode] = {"tok_s": median, "over_plain": median / ref if ref else None,
                         "linear_layer_us_per_token": rec["us_per_token"].get("linear_layer")}
    result = {
        "kind": "engine_breakdown", "tag": args.tag, "created": common.now_stamp(),
        "command": [sys.executable, *sys.argv], "machine": common.machine_info(),
        "versions": common.versions(), "git": common.git_revision(REPO_ROOT),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "modes": modes, "summary": summary,
    }
    out_json = os.path.join(args.results_dir, f"{args.tag}.json")
    common.write_json(out_json, result)
    for mode, s in summary.items():
        over = f"{s['over_plain']:.3f}x plain" if s["over_plain"] else ""
        print(f"{mode:6s} {s['tok_s']:7.1f} tok/s {over}")
        for k, v in sorted(modes[mode]["us_per_token"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:15s} {v:8.1f} us/token")
    print(f"wrote {out_json}")
    if not args.no_plot and (plt := common.pyplot()) is not None:
        parts = ("base_gemm", "packed_gemm", "slice_gemm", "gather_rows", "scaled",
                 "scale_out", "lora_on_output")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        names = list(modes)
        bottom = [0.0] * len(names)
        for i, part in enumerate(parts):
            vals = [modes[m]["us_per_token"].get(part, 0.0) for m in names]
            ax1.bar(names, vals, bottom=bottom, label=part, color=f"C{i}")
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax1.plot(names, [modes[m]["us_per_token"].get("linear_layer", 0.0) for m in names],
                 "k_", ms=30, label="whole layer")
        ax1.set(ylabel="us per generated token", title="linear layers, by section")
        ax1.legend(fontsize=7)
        ax2.bar(names, [summary[m]["tok_s"] for m in names], color="C0")
        ax2.set(ylabel="output tok/s (median)", title="engine in-process")
        fig.tight_layout()
        png = out_json.removesuffix(".json") + ".png"
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    return out_json


if __name__ == "__main__":
    main()
