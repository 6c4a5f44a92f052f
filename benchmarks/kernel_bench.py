"""Time one FLoRA linear: base matmul vs the torch FLoRA path vs the fused Triton kernel.

Every token sits on its own adapter (the worst case for batching), all adapters of one rank.
Per (shape, tokens, rank) it records p50/p90 microseconds of

    base    F.linear(x, W0, bias)                         (what a plain token costs)
    unfused flora_vllm.ops.torch_ops.flora_linear         (expands rows, has host syncs)
    fused   flora_vllm.ops.triton_ops.flora_linear_triton (one kernel, nothing expanded)

plus fused/base and fused/unfused ratios and the fused kernel's error against the fp32 torch
path, and writes benchmarks/results/kernel_<device>.json and a PNG plot (when matplotlib is
installed). On the GPU: `python benchmarks/kernel_bench.py --out benchmarks/results`. On the
CPU, `--smoke` runs one tiny fp32 shape with Triton under TRITON_INTERPRET=1, in seconds.
No vLLM import: it runs on a machine with torch and triton only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a plain script from a repo copy, nothing installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Config. Shapes are (in_features, out_features) of the adapted weights.
SHAPES: dict[str, list[tuple[int, int]]] = {
    "llama-2-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],  # qkv/o, gate/up, down
    "starcoder-15b": [(6144, 6400), (6144, 24576), (24576, 6144)],  # c_attn, c_fc, c_proj
}
TOKENS = (1, 16, 64, 256)  # decode-sized batches up to a prefill chunk
RANKS = (1, 2, 4, 8)
DTYPE = torch.bfloat16
WARMUP = 10  # also pays the Triton JIT compile of each tile config
ITERS = 50
SEED = 0
L2_FLUSH_BYTES = 256 << 20  # > L2 of H100 (50 MiB) and H200: every call starts cold

SMOKE_SHAPES: dict[str, list[tuple[int, int]]] = {"smoke": [(40, 24)]}
SMOKE_TOKENS = (1, 4)
SMOKE_RANKS = (1, 2)
SMOKE_DTYPE = torch.float32
SMOKE_WARMUP = 1
SMOKE_ITERS = 2


def device_name(device: torch.device, smoke: bool) -> str:
    """'nvidia-h100-80gb-hbm3' or 'cpu' (with '-smoke' for the smoke run): the file name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug + ("-smoke" if smoke else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> dict:
    """p50 / p90 / mean microseconds of fn(), synchronised before and after each call.

    On the GPU the L2 cache is overwritten before each call (outside the timed span), so a
    weight that fits in L2 (Llama 4096x4096 bf16 = 32 MiB) is still read from HBM as in serving.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    flush = torch.empty(
        L2_FLUSH_BYTES if device.type == "cuda" else 0, dtype=torch.int8, device=device
    )
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {
        "p50_us": statistics.median(samples),
        "p90_us": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
        "mean_us": statistics.fmean(samples),
    }


def make_inputs(
    n_in: int, n_out: int, n_tok: int, rank: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """x, W0, bias, slots (token t on slot t), A [T, r, in], B^T [T, r, out], ranks."""
    x = torch.randn(n_tok, n_in, device=device).to(dtype)
    weight = (torch.randn(n_out, n_in, device=device) / n_in**0.5).to(dtype)
    bias = (0.1 * torch.randn(n_out, device=device)).to(dtype)
    a = (1 + 0.1 * torch.randn(n_tok, rank, n_in, device=device)).to(dtype)
    b = ((1 + 0.1 * torch.randn(n_tok, rank, n_out, device=device)) / rank).to(dtype)
    slots = torch.arange(n_tok, device=device)
    ranks = torch.full((n_tok,), rank, dtype=torch.long, device=device)
    return x, weight, bias, slots, a, b, ranks


def _fp32(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Float tensors in fp32 (the error reference), integer ones unchanged."""
    return tuple(t.float() if t.is_floating_point() else t for t in tensors)


def machine_info(device: torch.device) -> dict:
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def bench_one(
    inputs: tuple[torch.Tensor, ...],
    device: torch.device,
    warmup: int,
    iters: int,
    with_fused: bool,
) -> dict:
    """Times (and fused error) of one configuration; inputs as `make_inputs` returns them."""
    from flora_vllm.ops import torch_ops, triton_ops

    x, weight, bias = inputs[:3]
    row = {
        "base": time_us(lambda: F.linear(x, weight, bias), device, warmup, iters),
        "unfused": time_us(lambda: torch_ops.flora_linear(*inputs), device, warmup, iters),
    }
    row["unfused_over_base"] = row["unfused"]["p50_us"] / row["base"]["p50_us"]
    if not with_fused:
        return row
    row["fused"] = time_us(lambda: triton_ops.flora_linear_triton(*inputs), device, warmup, iters)
    row["fused_over_base"] = row["fused"]["p50_us"] / row["base"]["p50_us"]
    row["fused_over_unfused"] = row["fused"]["p50_us"] / row["unfused"]["p50_us"]
    got = triton_ops.flora_linear_triton(*inputs).float()
    ref = torch_ops.flora_linear(*_fp32(inputs))
    row["fused_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    return row


def run(args: argparse.Namespace) -> dict:
    from flora_vllm.ops import triton_ops

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    smoke = args.smoke
    shapes = SMOKE_SHAPES if smoke else SHAPES
    tokens = SMOKE_TOKENS if smoke else args.tokens
    ranks = SMOKE_RANKS if smoke else args.ranks
    dtype = SMOKE_DTYPE if smoke else getattr(torch, args.dtype)
    warmup = SMOKE_WARMUP if smoke else args.warmup
    iters = SMOKE_ITERS if smoke else args.iters
    skip_reason = None
    if not triton_ops.is_triton_available():
        skip_reason = "triton not installed"
    elif device.type == "cpu" and not triton_ops.interpreter_active():
        skip_reason = "CPU run, and TRITON_INTERPRET=1 was not set before triton was imported"

    torch.manual_seed(SEED)
    rows = []
    for model, model_shapes in shapes.items():
        for n_in, n_out in model_shapes:
            for n_tok in tokens:
                for rank in ranks:
                    inputs = make_inputs(n_in, n_out, n_tok, rank, dtype, device)
                    row = {"model": model, "in": n_in, "out": n_out, "tokens": n_tok, "rank": rank}
                    row.update(bench_one(inputs, device, warmup, iters, with_fused=not skip_reason))
                    rows.append(row)
                    print(_summary(row), flush=True)
                    del inputs
    return {
        "machine": machine_info(device),
        "settings": {
            "smoke": smoke,
            "dtype": str(dtype).removeprefix("torch."),
            "warmup": warmup,
            "iters": iters,
            "seed": SEED,
            "tokens": list(tokens),
            "ranks": list(ranks),
            "adapters": "every token on its own adapter, all of the given rank, with bias",
            "timing": "per-call CUDA events (perf_counter on CPU), synced, L2 flushed before each",
            "fused_skipped": skip_reason,
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        },
        "results": rows,
    }


def _summary(row: dict) -> str:
    fused = row.get("fused", {}).get("p50_us")
    fused_s = (
        "skipped" if fused is None else f"{fused:9.1f} us ({row['fused_over_base']:.2f}x base)"
    )
    return (
        f"{row['model']:>14} {row['in']:>5}->{row['out']:<5} T={row['tokens']:<3} "
        f"r={row['rank']}  base {row['base']['p50_us']:9.1f} us  "
        f"unfused {row['unfused']['p50_us']:9.1f} us  fused {fused_s}"
    )


def plot(report: dict, path: str) -> bool:
    """fused/base (solid) and unfused/base (dashed) against tokens, one panel per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", flush=True)
        return False
    rows = report["results"]
    shapes = list(dict.fromkeys((r["model"], r["in"], r["out"]) for r in rows))
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, (model, n_in, n_out) in zip(axes[0], shapes, strict=True):
        for i, rank in enumerate(ranks):
            pts = [
                r
                for r in rows
                if (r["model"], r["in"], r["out"], r["rank"]) == (model, n_in, n_out, rank)
            ]
            toks = [r["tokens"] for r in pts]
            color = f"C{i}"
            if all("fused_over_base" in r for r in pts):
                ax.plot(
                    toks,
                    [r["fused_over_base"] for r in pts],
                    "o-",
                    color=color,
                    label=f"fused r={rank}",
                )
            ax.plot(
                toks,
                [r["unfused_over_base"] for r in pts],
                "x--",
                color=color,
                label=f"torch r={rank}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{model} {n_in}->{n_out}", fontsize=9)
        ax.set_xlabel("tokens (each on its own adapter)")
    axes[0][0].set_ylabel("time / base matmul (p50)")
    axes[0][-1].legend(fontsize=7)
    machine = report["machine"]
    fig.suptitle(
        f"FLoRA linear, {report['settings']['dtype']}, "
        f"{machine['gpu'] or 'cpu'}, torch {machine['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        default=os.path.join(REPO_ROOT, "benchmarks", "results"),
        help="folder for kernel_<device>.json and .png",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="one tiny fp32 shape, T in (1, 4), ranks (1, 2): seconds, CPU-friendly",
    )
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument(
        "--dtype",
        default=str(DTYPE).removeprefix("torch."),
        choices=["bfloat16", "float16", "float32"],
    )
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--iters", type=int, default=ITERS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_cpu = args.cpu or not torch.cuda.is_available()
    if args.smoke and on_cpu and "triton" not in sys.modules:
        # Must precede triton's import (a plain script run); otherwise the fused timing skips.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(report["machine"]["device"])
    stem = os.path.join(args.out, f"kernel_{device_name(device, args.smoke)}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.json", flush=True)
    if plot(report, stem + ".png"):
        print(f"wrote {stem}.png", flush=True)
    return report


if __name__ == "__main__":
    main()
