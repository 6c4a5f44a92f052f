"""Layer-level check of the FLoRA execution policy (issue #8): expanded vs merged vs auto.

One adapted linear layer, every token on ONE adapter (the segment case the policy decides),
time relative to the base matmul alone, per token count and rank. `auto` runs the calibrated
cost model's choice, with the merge paid in full (no cache), so it is compared like for like.
Writes benchmarks/results/policy_<device>.json (+ a PNG when matplotlib is installed).

    python benchmarks/policy_bench.py                    # 4096x4096 fp32 on this CPU
    python benchmarks/policy_bench.py --smoke --out /tmp  # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flora_vllm.ops.policy import calibrate, plan_segments  # noqa: E402
from flora_vllm.ops.torch_ops import flora_linear_segments, linear_gemm, merge_slot  # noqa: E402


def _serving_gemm():
    """The GEMM the FLoRA layers use when served: vLLM's packed CPU GEMM where vLLM imports,
    else F.linear (e.g. on the GPU box, which has no vLLM)."""
    try:
        from flora_vllm.hooks.worker_step import make_gemm
    except ImportError:
        return linear_gemm, "F.linear"
    return make_gemm, "vllm-cpu-gemm"

TOKENS = (16, 64, 256)
RANKS = (1, 2, 4, 8)
SIZE = 4096
REPS = 5


def _time(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _cell(weight, a, b, x, cost, reps: int, sync, make_gemm) -> dict:
    """Times of one (tokens, rank) cell, all tokens on slot 0, relative to the base matmul."""
    r, n = a.shape[1], x.shape[0]
    ranks_t = torch.tensor([r], device=x.device)
    slots = torch.zeros(n, dtype=torch.long, device=x.device)
    gemm = make_gemm(weight)

    def expanded() -> None:
        flora_linear_segments(x, weight, None, slots, a, b, ranks_t, {}, gemm)

    def merged() -> None:
        w = make_gemm(merge_slot(weight, a, b, 0, r))  # merge + pack paid every call: no cache
        flora_linear_segments(x, weight, None, slots, a, b, ranks_t, {0: w}, gemm)

    use_merged = plan_segments([r], [n], [False], 0, weight.numel(), cost)[0]
    base = _time(lambda: gemm(x), reps, sync)
    t_exp = _time(expanded, reps, sync)
    t_mrg = _time(merged, reps, sync)
    t_auto = _time(merged if use_merged else expanded, reps, sync)
    return {
        "tokens": n, "rank": r, "base_s": base,
        "expanded_x": t_exp / base, "merged_x": t_mrg / base, "auto_x": t_auto / base,
        "auto_choice": "merged" if use_merged else "expanded",
        "auto_vs_best": t_auto / min(t_exp, t_mrg),
    }


def run(size: int, tokens: tuple[int, ...], ranks: tuple[int, ...], reps: int, device: str,
        dtype: torch.dtype) -> dict:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.randn(size, size, generator=gen).to(dev, dtype)
    make_gemm, gemm_name = _serving_gemm() if dev.type == "cpu" else (linear_gemm, "F.linear")
    cost = calibrate(device, dtype, make_gemm=make_gemm)
    rows = []
    for r in ranks:
        a = (1 + 0.1 * torch.randn(1, r, size, generator=gen)).to(dev, dtype)
        b = ((1 + 0.1 * torch.randn(1, r, size, generator=gen)) / r).to(dev, dtype)
        for n in tokens:
            x = torch.randn(n, size, generator=gen).to(dev, dtype)
            rows.append(_cell(weight, a, b, x, cost, reps, sync, make_gemm))
            row = rows[-1]
            print(f"T={n:4d} r={r}: expanded {row['expanded_x']:5.2f}x  "
                  f"merged {row['merged_x']:5.2f}x  auto[{row['auto_choice']:8s}] "
                  f"{row['auto_x']:5.2f}x  auto/best {row['auto_vs_best']:4.2f}")
    return {"cost_model": cost.__dict__, "gemm": gemm_name, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--reps", type=int, default=REPS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.tokens, args.ranks, args.reps = 128, [4, 32], [1, 4], 2
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    result = run(args.size, tuple(args.tokens), tuple(args.ranks), args.reps, args.device, dtype)
    result["settings"] = {**vars(args), "dtype": str(dtype)}
    result["machine"] = {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    os.makedirs(args.out, exist_ok=True)
    name = "policy_" + ("cpu" if args.device == "cpu" else "gpu") + ("_smoke" if args.smoke else "")
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    _plot(result, os.path.join(args.out, name + ".png"))
    return 0


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = result["rows"]
    tokens = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(4 * len(tokens), 3.2), squeeze=False)
    for ax, n in zip(axes[0], tokens, strict=True):
        sel = [r for r in rows if r["tokens"] == n]
        ranks = [r["rank"] for r in sel]
        for key, style in (("expanded_x", "o-"), ("merged_x", "s-"), ("auto_x", "k--")):
            ax.plot(ranks, [r[key] for r in sel], style, label=key.removesuffix("_x"))
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"{n} tokens, one adapter", xlabel="rank", ylabel="time / base matmul")
        ax.set_xscale("log", base=2)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
