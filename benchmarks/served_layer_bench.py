"""Served-layer benchmark (CPU): the real `<Base>WithFLoRA` layers, built as a vLLM worker builds
them, timed against vLLM's own plain packed GEMM and vLLM's LoRA r=1 at the model shapes served.

Why (issue #25): rank-1 FLoRA does exactly the multiply-adds of the packed GEMM, so a served
FLoRA r=1 layer should cost that GEMM plus two passes over the activations. This times the
shipping code (`layer.forward`, i.e. `FLoRALinearMixin.apply`, with the plugin's hooks
installed) and breaks its time into parts, so the next change aims at the right one.

How a layer is built (no engine): the plugin's hooks (`flora_vllm.hooks.apply_hooks`, as in a
worker), vLLM's base layer (QKVParallelLinear, MergedColumnParallelLinear, ColumnParallelLinear,
RowParallelLinear) with random weights, `process_weights_after_loading` (vLLM's CPU GEMM dispatch),
then `vllm.lora.utils.from_layer` under a vLLM config with LoRA on: the same class and state a
worker gets. Each scenario has its own vLLM `PunicaWrapperCPU` with the step's mapping
(`update_metadata`, `is_prefill=True` as vLLM's V1 runner always passes).

Paths timed per (model, layer, T tokens), interleaved call by call (round r runs every path
once, in a rotated order), median of the rounds, and the median over rounds of each path's
time / the packed GEMM's time in that same round (the ratio a busy machine still gives):

    packed_gemm     base_layer.forward(x): vLLM's plain packed CPU GEMM (what a plain server runs)
    base_tokens     the FLoRA layer, every token without adapter (adapter mode's cost)
    flora_all_1     every token on one FLoRA r=1 adapter
    flora_all_T     T tokens on T distinct FLoRA r=1 adapters
    flora_half_1    half the tokens on one FLoRA adapter, half without adapter (interleaved)
    flora_half_T    half on T/2 distinct FLoRA adapters, half without adapter
    flora_tied_T    T distinct adapters whose input scalings are the same for every slice of a
                    packed layer (IA3 form, tied training; packed layers only)
    lora_1, lora_T  vLLM LoRA r=1 (one adapter / T distinct) through the same layer class: vLLM's
                    base GEMM + its CPU punica `add_lora_linear` (vLLM's `_apply_lora_to_output`)

Breakdown: each FLoRA path also runs under torch.profiler; top-level ops are sorted into parts
(gather, scale_in, gemm, scale_out, cat, dtype, bias, finite, other ops) and the rest of the
profiled wall time is `python` (host code between ops). Profiled times include the profiler's
own cost; read them as shares.

Run: `python benchmarks/served_layer_bench.py` (benchmark model, T = 1 16 64 256, about 4 min on
2 cores); `--models llama120m llama7b starcoder15b` adds the big shapes (fp32: minutes each;
`--quick` caps them at T <= 64 and fewer rounds); `--smoke` one tiny model in seconds.
Output: <out>/served_layer_<tag>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # a plain repo copy: flora_vllm and benchmarks import uninstalled

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

# ---- Config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One served linear: `kind` picks vLLM's base class, `packed` the modules a model declares
    for it (which decides the FLoRA class and its slices)."""

    kind: str  # "qkv" | "merged" | "column" | "row"
    in_size: int
    outs: tuple[int, ...]  # output slices as vLLM packs them (q, k, v / gate, up / one)
    packed: tuple[str, ...]
    bias: bool = False
    head_size: int = 0  # qkv only

    @property
    def out_size(self) -> int:
        return sum(self.outs)


def _llama(hidden: int, heads: int, kv_heads: int, head: int, ffn: int) -> dict[str, LayerSpec]:
    q, kv = heads * head, kv_heads * head
    return {
        "qkv": LayerSpec("qkv", hidden, (q, kv, kv), ("q_proj", "k_proj", "v_proj"), False, head),
        "o": LayerSpec("row", q, (hidden,), ("o_proj",)),
        "gate_up": LayerSpec("merged", hidden, (ffn, ffn), ("gate_proj", "up_proj")),
        "down": LayerSpec("row", ffn, (hidden,), ("down_proj",)),
    }


def _starcoder(hidden: int, heads: int, head: int, ffn: int) -> dict[str, LayerSpec]:
    # GPTBigCode through vLLM's Transformers backend: c_attn is one module (multi-query)
    q = heads * head
    return {
        "c_attn": LayerSpec("qkv", hidden, (q, head, head), ("c_attn",), True, head),
        "c_proj": LayerSpec("row", q, (hidden,), ("c_proj",), True),
        "c_fc": LayerSpec("column", hidden, (ffn,), ("c_fc",), True),
        "mlp_c_proj": LayerSpec("row", ffn, (hidden,), ("c_proj",), True),
    }


MODELS: dict[str, dict[str, LayerSpec]] = {
    # the serving benchmark's model of issue #25: 1024 wide, 16 query / 4 KV heads of 64
    "llama120m": _llama(1024, 16, 4, 64, 2816),
    "llama7b": _llama(4096, 32, 32, 128, 11008),
    "starcoder15b": _starcoder(6144, 48, 128, 24576),
}
SMOKE_MODELS: dict[str, dict[str, LayerSpec]] = {"smoke": _llama(128, 2, 1, 64, 96)}
TOKENS = (1, 16, 64, 256)
QUICK_TOKENS = (1, 16, 64)
SMOKE_TOKENS = (1, 8)
SEED = 0
WARMUP = 3
MIN_ROUNDS, MAX_ROUNDS = 7, 41
ROUND_BUDGET_S = 4.0  # rounds per point: until MAX_ROUNDS or this many seconds of timed calls
PROFILE_CALLS, PROFILE_CHUNKS = 3, 5  # per-part medians over 5 profiles of 3 calls

PATHS: dict[str, str] = {
    "packed_gemm": "base_layer.forward: vLLM's plain packed CPU GEMM (a plain server)",
    "base_tokens": "FLoRA layer, no token with an adapter",
    "flora_all_1": "every token on one FLoRA r=1 adapter",
    "flora_all_T": "T tokens on T distinct FLoRA r=1 adapters",
    "flora_half_1": "half on one FLoRA adapter, half without adapter",
    "flora_half_T": "half on T/2 distinct FLoRA adapters, half without adapter",
    "flora_tied_T": "T distinct FLoRA adapters with input scalings tied across slices",
    "lora_1": "vLLM LoRA r=1, one adapter: base GEMM + punica add_lora_linear",
    "lora_T": "vLLM LoRA r=1, T distinct adapters",
}
FLORA_PATHS = ("flora_all_1", "flora_all_T", "flora_half_1", "flora_half_T", "flora_tied_T")
PARTS = ("gather", "scale_in", "gemm", "scale_out", "cat", "dtype", "bias", "finite", "other_ops",
         "python")


# ---- Building a served layer without an engine -------------------------------------------------


def _tp1() -> None:
    """vLLM's TP rank/size lookups answer (0, 1): no process group needed."""
    from vllm.model_executor import parameter
    from vllm.model_executor.layers import linear

    for module in (linear, parameter):
        module.get_tensor_model_parallel_world_size = lambda: 1
        module.get_tensor_model_parallel_rank = lambda: 0


def build_layer(
    spec: LayerSpec, name: str, dtype: torch.dtype, max_loras: int, gen: torch.Generator
) -> torch.nn.Module:
    """The `<Base>WithFLoRA` layer a worker gets for this module (random weights)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.utils import from_layer
    from vllm.model_executor.layers import linear

    kw: dict[str, Any] = {"bias": spec.bias, "params_dtype": dtype, "prefix": f"bench.{name}"}
    if spec.kind == "qkv":
        heads, kv_heads = spec.outs[0] // spec.head_size, spec.outs[1] // spec.head_size
        base = linear.QKVParallelLinear(spec.in_size, spec.head_size, heads, kv_heads, **kw)
    elif spec.kind == "merged":
        base = linear.MergedColumnParallelLinear(spec.in_size, list(spec.outs), **kw)
    elif spec.kind == "column":
        base = linear.ColumnParallelLinear(spec.in_size, spec.out_size, **kw)
    else:
        base = linear.RowParallelLinear(spec.in_size, spec.out_size, **kw)
    with torch.no_grad():
        w = torch.randn(base.weight.shape, generator=gen) * spec.in_size**-0.5
        base.weight.copy_(w.to(dtype))
        del w
        if base.bias is not None:
            base.bias.copy_((0.1 * torch.randn(base.bias.shape, generator=gen)).to(dtype))
    base.quant_method.process_weights_after_loading(base)  # vLLM's CPU GEMM dispatch
    lora_config = LoRAConfig(max_lora_rank=1, max_loras=max_loras, lora_dtype=dtype)
    return from_layer(base, max_loras, lora_config, list(spec.packed))


def _flora_factors(
    spec: LayerSpec, layer: Any, gen: torch.Generator, tied: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rank-1 factors per adapter slice of the layer: a [1, in], b [out, 1]."""
    outs = [out for out, _ in layer.flora_full_shapes()]
    a0 = 1 + 0.1 * torch.randn(1, spec.in_size, generator=gen)
    a = [a0 if tied else 1 + 0.1 * torch.randn(1, spec.in_size, generator=gen) for _ in outs]
    b = [1 + 0.1 * torch.randn(out, 1, generator=gen) for out in outs]
    return a, b


def fill_slots(layer: Any, spec: LayerSpec, group: str, n: int, gen: torch.Generator) -> None:
    """Slots 0..n-1 hold `group` adapters: "flora", "tied" (FLoRA, tied input scalings), "lora"."""
    for slot in range(n):
        if group == "lora":
            outs = [out for out, _ in layer.flora_full_shapes()]
            a = [0.1 * torch.randn(1, spec.in_size, generator=gen) for _ in outs]
            b = [0.1 * torch.randn(out, 1, generator=gen) for out in outs]
            layer.reset_flora(slot)
            if layer.n_slices == 1:
                layer.set_lora(slot, a[0], b[0])
            else:
                layer.set_lora(slot, a, b)
        else:
            a, b = _flora_factors(spec, layer, gen, tied=group == "tied")
            layer.reset_lora(slot)
            layer.set_flora(slot, a, b)


def make_wrapper(slots: Sequence[int], max_loras: int) -> Any:
    """vLLM's CPU punica wrapper holding one step's mapping (adapter id = slot + 1)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    n = max(len(slots), 1)
    wrapper = PunicaWrapperCPU(n, n, device="cpu")
    ids = tuple(s + 1 for s in slots)
    mapping = LoRAMapping(ids, ids, is_prefill=True)
    wrapper.update_metadata(mapping, list(range(1, max_loras + 1)), max_loras + 1, 32000)
    return wrapper


def scenario_slots(path: str, n_tok: int) -> list[int] | None:
    """Each token's slot (-1: none) for a layer path; None when the path does not apply."""
    if path in ("packed_gemm", "base_tokens"):
        return [-1] * n_tok
    half = path.startswith("flora_half")
    if half and n_tok < 2:
        return None
    distinct = path.endswith("_T")
    if half:  # even tokens adapted, odd ones plain
        return [(t // 2 if distinct else 0) if t % 2 == 0 else -1 for t in range(n_tok)]
    return [t if distinct else 0 for t in range(n_tok)]


# ---- Timing ------------------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU time of this process: with --threads 1, time spent descheduled by other jobs on the
    # machine does not count (what a shared 2-core box needs); with more threads it would
    # count the OpenMP workers' spinning too
    "cpu": time.process_time,
}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, min_rounds: int, max_rounds: int,
    budget_s: float, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, float]]:
    """Every path once per round, in a rotated order; median time and median ratio to
    `packed_gemm` in the same round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    spent, rounds = 0.0, 0
    while rounds < min_rounds or (rounds < max_rounds and spent < budget_s):
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        for n in order:
            t0, w0 = clock(), time.perf_counter()
            fns[n]()
            samples[n].append((clock() - t0) * 1e6)
            spent += time.perf_counter() - w0
        rounds += 1
    base = samples["packed_gemm"]
    out = {}
    for n, s in samples.items():
        ratios = [v / b for v, b in zip(s, base, strict=True)]
        ss = sorted(s)
        out[n] = {
            "median_us": statistics.median(s),
            "p10_us": ss[int(0.1 * (len(ss) - 1))],
            "p90_us": ss[-1 - int(0.1 * (len(ss) - 1))],
            "ratio_to_packed": statistics.median(ratios),
            "rounds": len(s),
        }
    return out


_GEMM_OPS = ("onednn_mm", "weight_packed_linear", "linear", "addmm", "mm", "bmm", "baddbmm",
             "matmul", "zentorch")
_GATHER_OPS = ("index", "index_select", "embedding", "gather", "take")


def breakdown(fn: Callable[[], Any], calls: int, chunks: int = PROFILE_CHUNKS) -> dict[str, float]:
    """Per-call microseconds of each part of `fn`: the median over `chunks` profiles of `calls`
    calls each (a call descheduled by another job inflates one chunk, not the result)."""
    fn()
    parts = [_profile_parts(fn, calls) for _ in range(chunks)]
    return {k: statistics.median(p[k] for p in parts) for k in parts[0]}


def _profile_parts(fn: Callable[[], Any], calls: int) -> dict[str, float]:
    """Per-call microseconds of each part of `fn` under torch.profiler (top-level ops only;
    `python` = profiled wall time not inside any op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - t0) * 1e6
    parts = dict.fromkeys(PARTS, 0.0)
    events = sorted(
        (e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start
    )
    after_gemm = False
    for e in events:
        op = e.name.split("::")[-1]
        us = e.cpu_time_total
        if op.startswith(_GEMM_OPS):
            part, after_gemm = "gemm", True
        elif op in _GATHER_OPS:
            part = "gather"
        elif op.startswith("mul"):
            part = "scale_out" if after_gemm else "scale_in"
            after_gemm = False if part == "scale_out" else after_gemm
        elif op == "cat":
            part = "cat"
        elif op in ("to", "_to_copy", "copy_", "type_as"):
            part = "dtype"
        elif op in ("add_", "add"):
            part = "bias"
        elif op.startswith("nan_to_num"):
            part = "finite"
        else:
            part = "other_ops"
        parts[part] += us
    parts["python"] = max(wall - sum(parts.values()), 0.0)
    out = {k: v / calls for k, v in parts.items()}
    out["profiled_wall_us"] = wall / calls
    return out


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def rank1_reference(layer: Any, x: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
    """y_t = b_s ∘ (W (a_s ∘ x_t)) + bias per slice, from the layer's stacks with F.linear in
    fp32 (a check that the timed path computes the FLoRA answer, not an oracle)."""
    weight = layer.base_layer.weight.float()
    bias = layer.base_layer.bias
    idx = torch.tensor([s if s >= 0 else len(layer.flora_a[0]) - 1 for s in slots])
    outs, start = [], 0
    for i, size in enumerate(layer.output_slices):
        a, b = layer.flora_a[i][idx, 0].float(), layer.flora_b[i][idx, 0].float()
        y = torch.nn.functional.linear(x.float() * a, weight[start : start + size]) * b
        outs.append(y)
        start += size
    y = torch.cat(outs, dim=-1)
    return y if bias is None else y + bias.float()


# ---- Driver ------------------------------------------------------------------------------------


def _out(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def run_layer(
    model: str, name: str, spec: LayerSpec, tokens: Sequence[int], dtype: torch.dtype,
    rounds: tuple[int, int, float], profile: bool, gen: torch.Generator,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    max_loras = max(tokens)
    layer = build_layer(spec, f"{model}.{name}", dtype, max_loras, gen)
    base = layer.base_layer
    packed_slices = len(layer.output_slices) > 1
    groups = {  # slot contents -> paths that read them
        "flora": ["base_tokens", "flora_all_1", "flora_all_T", "flora_half_1", "flora_half_T"],
        "tied": ["flora_tied_T"] if packed_slices else [],
        "lora": ["lora_1", "lora_T"],
    }
    rows = {n_tok: {"model": model, "layer": name, "tokens": n_tok, "in_features": spec.in_size,
                    "out_slices": list(layer.output_slices), "flora_class": type(layer).__name__,
                    "times": {}, "breakdown": {}, "rel_err": {}} for n_tok in tokens}
    for group, paths in groups.items():
        if not paths:
            continue
        fill_slots(layer, spec, group, max_loras, gen)
        for n_tok in tokens:
            x = torch.randn(n_tok, spec.in_size, generator=gen).to(dtype)
            fns: dict[str, Callable[[], Any]] = {"packed_gemm": lambda x=x: base.forward(x)}
            wrappers = {}
            for p in paths:
                slots = scenario_slots(p.replace("tied", "all"), n_tok)
                if slots is None:
                    continue
                w = make_wrapper(slots, max_loras)
                wrappers[p] = (w, slots)

                def call(w: Any = w, x: torch.Tensor = x) -> Any:
                    layer.punica_wrapper = w
                    return layer.forward(x)

                fns[p] = call
            row = rows[n_tok]
            for p, (_, slots) in wrappers.items():
                if p.startswith("flora") or p == "base_tokens":
                    row["rel_err"][p] = rel_err(_out(fns[p]()), rank1_reference(layer, x, slots))
            times = time_interleaved(fns, WARMUP, *rounds, clock=clock)
            if group == "flora" or "packed_gemm" not in row["times"]:
                row["times"]["packed_gemm"] = times["packed_gemm"]
            for p in wrappers:
                row["times"][p] = times[p]
            if profile:
                for p in wrappers:
                    if p.startswith("flora"):
                        row["breakdown"][p] = breakdown(fns[p], PROFILE_CALLS)
                row["breakdown"].setdefault(
                    "packed_gemm", breakdown(fns["packed_gemm"], PROFILE_CALLS)
                )
            summary = " ".join(
                f"{p}={t['ratio_to_packed']:.2f}x" for p, t in times.items() if p != "packed_gemm"
            )
            packed_us = times["packed_gemm"]["median_us"]
            print(f"{model:>12} {name:>10} T={n_tok:<4} packed={packed_us:.0f}us {summary}",
                  flush=True)
    return [rows[n] for n in tokens]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.lora import LoRAConfig

    from flora_vllm.hooks import apply_hooks

    apply_hooks()  # as in a worker: the CPU GEMM hook, the punica hooks, the FLoRA classes
    _tp1()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.smoke:
        models, tokens = SMOKE_MODELS, SMOKE_TOKENS
        rounds = (3, 3, 0.0)
    else:
        models = {m: MODELS[m] for m in args.models}
        tokens = tuple(args.tokens or (QUICK_TOKENS if args.quick else TOKENS))
        rounds = (3, 7, 2.0) if args.quick else (MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET_S)
    if args.rounds:
        rounds = (args.rounds, args.rounds, 0.0)
    gen = torch.Generator().manual_seed(SEED)
    config = VllmConfig()
    config.lora_config = LoRAConfig(max_lora_rank=1, max_loras=max(tokens), lora_dtype=dtype)
    rows = []
    with set_current_vllm_config(config), torch.inference_mode():
        for model, layers in models.items():
            for name, spec in layers.items():
                if args.layers and name not in args.layers:
                    continue
                rows += run_layer(model, name, spec, tokens, dtype, rounds, not args.no_profile,
                                  gen, CLOCKS[args.clock])
    return {
        "kind": "served_layer",
        "machine": common.machine_info(),
        "versions": common.versions(),
        "git": common.git_revision(REPO_ROOT),
        "settings": {
            "device": "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "smoke": args.smoke,
            "quick": args.quick,
            "models": {m: {n: vars(s) for n, s in ls.items()} for m, ls in models.items()},
            "tokens": list(tokens),
            "torch_threads": torch.get_num_threads(),
            "rounds": {"min": rounds[0], "max": rounds[1], "budget_s": rounds[2]},
            "warmup": WARMUP,
            "seed": SEED,
            "adapters": "rank 1; slots 0..max(T)-1 refilled per group (FLoRA, tied FLoRA, LoRA)",
            "timing": f"{args.clock} clock per call, paths interleaved per round",
            "clock": args.clock,
            "statistic": "median over rounds; ratio = median of per-round time / packed_gemm",
            "breakdown": "torch.profiler top-level ops, per call, profiler overhead included",
        },
        "paths": PATHS,
        "results": rows,
    }


def print_summary(result: dict[str, Any]) -> None:
    rows = result["results"]
    paths = [p for p in PATHS if p != "packed_gemm"]
    print("\ntime / vLLM packed GEMM (median of per-round ratios)")
    print(f"{'model':>12} {'layer':>10} {'T':>4} {'packed_us':>9} "
          + " ".join(f"{p:>12}" for p in paths))
    for r in rows:
        t = r["times"]
        cells = [f"{t[p]['ratio_to_packed']:>12.2f}" if p in t else f"{'-':>12}" for p in paths]
        print(f"{r['model']:>12} {r['layer']:>10} {r['tokens']:>4} "
              f"{t['packed_gemm']['median_us']:>9.0f} " + " ".join(cells))


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["llama120m"])
    ap.add_argument("--layers", nargs="+", help="only these layer names (qkv, o, gate_up, ...)")
    ap.add_argument("--tokens", nargs="+", type=int, help=f"token counts (default {TOKENS})")
    ap.add_argument("--quick", action="store_true",
                    help=f"T {QUICK_TOKENS}, 3-7 rounds: the 7B / 15B shapes in minutes")
    ap.add_argument("--smoke", action="store_true", help="one tiny LLaMA, T (1, 8), 3 rounds")
    ap.add_argument("--rounds", type=int, help="exactly this many timed rounds per point")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall (perf_counter) or cpu (process CPU time; use with --threads 1 "
                    "on a machine other jobs share)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-part breakdown")
    ap.add_argument("--tag", help="file name tag (default: cpu, cpu-smoke)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    result = run(args)
    tag = args.tag or ("cpu-smoke" if args.smoke else "cpu")
    path = os.path.join(args.out, f"served_layer_{tag}.json")
    common.write_json(path, result)
    print_summary(result)
    print(f"\nwrote {path}")
    if not args.no_plot:
        from benchmarks import plot

        png = plot.plot_served_layer(result, path.removesuffix(".json") + ".png")
        if png:
            print(f"wrote {png}")
    return path


if __name__ == "__main__":
    main()
