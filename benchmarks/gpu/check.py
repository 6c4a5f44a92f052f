"""Correctness on the device, before the timings: the kernels `layer_bench.py` times must
compute what their torch references compute, at the shapes and dtypes it times them.

    flora   flora_vllm.ops.triton_ops.flora_linear_triton (the fused FLoRA kernel) against
            flora_vllm.ops.torch_ops.flora_linear in fp32 on the same rounded inputs: one batch
            of mixed ranks (1, 2, 4, 8, 16, a rank-0 slot) with plain tokens (slot -1) between.
            It must stay within the dtype's tolerance and no worse than the torch op run in the
            same dtype (which rounds every rank row) by more than a quarter of it.
    lora    vLLM's lora_shrink + lora_expand (the installed vLLM's, else the vendored copy in
            benchmarks/gpu/vendor/vllm_lora) added onto a base output, against the torch LoRA
            y0 + scale * (x A_s^T) B_s^T in fp32, tokens on several slots and on none (-1):
            one slice per layer shape (what layer_bench times), and packed layers of several
            slices as vLLM serves them (qkv of equal slices; StarCoder's multi-query c_attn).

Error: max |got - ref| / max |ref| (for LoRA also of the LoRA term alone, so that y0 cannot
hide a wrong term). Tolerance: bfloat16 2e-2, float16 5e-3, float32 1e-4.

    python benchmarks/gpu/check.py --out DIR          CUDA: Llama-2-7B and StarCoder-15B shapes
    python benchmarks/gpu/check.py --tiny --out DIR   CPU under TRITON_INTERPRET=1, in seconds

Writes DIR/check_<gpu>.json (or check_cpu-tiny.json) and exits 1 when a case fails. Needs
torch and triton; no vLLM (`bash benchmarks/gpu/run.sh` runs it first).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)  # a plain repo copy: flora_vllm and benchmarks import uninstalled

# ---- Config ------------------------------------------------------------------------------------
TOKENS = (1, 16, 256)
LORA_RANKS = (1, 4, 16)
FLORA_SLOT_RANKS = (1, 2, 4, 8, 16, 0)  # one batch holds them all, plus plain tokens
DTYPES = ("bfloat16", "float16")
TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}
LORA_SCALE = 0.5
SEED = 0

# Under Triton's interpreter every program costs milliseconds: small shapes, few tokens, and
# float16 / float32 only (bfloat16 loads read garbage under the interpreter of triton 3.9).
TINY_SHAPES: dict[str, tuple[int, int, bool]] = {"tiny-odd": (37, 53, True)}
# Packed layers: name -> (in_features, output slices), each slice with its own A and B.
PACKED = {
    "llama7b-qkv": (4096, (4096, 4096, 4096)),
    "starcoder15b-c_attn": (6144, (6144, 128, 128)),  # multi-query: slices of unequal width
}
TINY_PACKED = {"tiny-packed": (37, (24, 8))}  # unequal widths: the strided-pointer path
TINY_TOKENS = (5,)
TINY_LORA_RANKS = (1, 4)
TINY_FLORA_SLOT_RANKS = (1, 2, 4, 0)
TINY_FLORA_DTYPES = ("float32", "float16")
TINY_LORA_DTYPES = ("float16",)


def rel_err(got, ref) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def flora_case(
    in_f: int, out_f: int, bias: bool, n_tok: int, slot_ranks: Sequence[int], dtype, device, gen
) -> dict[str, Any]:
    """One mixed batch through the fused kernel, against the fp32 torch op."""
    import torch

    from flora_vllm.ops.torch_ops import flora_linear
    from flora_vllm.ops.triton_ops import flora_linear_triton

    n_slot, max_rank = len(slot_ranks), max(slot_ranks)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    a = torch.ones(n_slot, max_rank, in_f, device=device)  # rows >= rank: never read
    b = torch.ones(n_slot, max_rank, out_f, device=device)
    for s, r in enumerate(slot_ranks):
        a[s, :r] = 1 + 0.3 * randn(r, in_f)
        b[s, :r] = (1 + 0.3 * randn(r, out_f)) / max(r, 1)
    slots = torch.arange(n_tok, device=device) % (n_slot + 1) - 1  # -1, 0, 1, ..., S-1, -1, ...
    slots = slots[torch.randperm(n_tok, generator=gen, device=device)]
    args = [
        randn(n_tok, in_f),  # x
        randn(out_f, in_f) * in_f**-0.5,  # W0
        randn(out_f) * 0.1 if bias else None,
        slots,
        a,
        b,
        torch.tensor(slot_ranks, device=device),
    ]
    args = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in args]
    fp32 = [t.float() if t is not None and t.is_floating_point() else t for t in args]
    ref = flora_linear(*fp32)
    got = flora_linear_triton(*args)
    err, err_torch = rel_err(got, ref), rel_err(flora_linear(*args), ref)
    tol = TOL[str(dtype).removeprefix("torch.")]
    return {
        "rel_err": err,
        "rel_err_torch_same_dtype": err_torch,
        "ok": bool(got.dtype == dtype and err <= tol and err <= 2 * err_torch + tol / 4),
    }


def lora_case(
    in_f: int, slice_outs: Sequence[int], n_tok: int, rank: int, dtype, device, gen, ops, utils
) -> dict[str, Any]:
    """vLLM's shrink + expand onto y0 (a packed output of the slices' widths), tokens on
    shared slots and on none, against torch."""
    import torch

    n_slot = max(1, n_tok // 2)  # several tokens share a slot, as requests' tokens do

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)

    x = randn(n_tok, in_f)
    a_list = [randn(n_slot, rank, in_f, scale=in_f**-0.5) for _ in slice_outs]  # [S, r, in]
    b_list = [randn(n_slot, o, rank) for o in slice_outs]  # [S, out_i, r]
    y0 = randn(n_tok, sum(slice_outs))
    slots = torch.randint(-1, n_slot, (n_tok,), generator=gen, device=device)
    slots[-1] = n_slot - 1  # a LoRA token, always
    if n_tok > 1:
        slots[0] = -1  # and a plain one

    utils._LORA_A_PTR_DICT.clear()  # strides are cached by data pointer
    utils._LORA_B_PTR_DICT.clear()
    meta = ops.LoRAKernelMeta.make(max_loras=n_slot, max_num_tokens=n_tok, device=device)
    meta.prepare_tensors(slots.to(torch.int32))
    meta_args = meta.meta_args(n_tok, False)
    h = torch.zeros(len(slice_outs), n_tok, rank, dtype=torch.float32, device=device)
    ops.lora_shrink(x, a_list, h, *meta_args, LORA_SCALE)  # h: [slices, T, r]
    term = torch.zeros_like(y0)  # the LoRA term alone: its error is not hidden by y0
    ops.lora_expand(h, b_list, term, *meta_args, offset_start=0, add_inputs=True)
    y = y0.clone()  # and added onto a base output, as vLLM does
    ops.lora_expand(h, b_list, y, *meta_args, offset_start=0, add_inputs=True)

    on = slots >= 0
    safe = slots.clamp(min=0)
    deltas = []
    for lora_a, lora_b in zip(a_list, b_list, strict=True):
        h_ref = LORA_SCALE * torch.einsum("ti,tri->tr", x.float(), lora_a[safe].float())
        deltas.append(torch.einsum("tr,tor->to", h_ref, lora_b[safe].float()))  # [T, out_i]
    delta = torch.where(on[:, None], torch.cat(deltas, dim=1), 0.0)  # [T, out]
    err_term, err = rel_err(term, delta), rel_err(y, y0.float() + delta)
    plain_kept = bool(torch.equal(y[~on], y0[~on]))  # tokens without LoRA are left alone
    tol = TOL[str(dtype).removeprefix("torch.")]
    return {
        "rel_err": err,
        "rel_err_lora_term": err_term,
        "plain_tokens_unchanged": plain_kept,
        "ok": err <= tol and err_term <= tol and plain_kept,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "gpu"),
                    help="output folder (or a .json file)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

    import torch

    from benchmarks import common, layer_bench

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not layer_bench.interpreter_on():
        raise SystemExit(
            "no CUDA device: run with --tiny (TRITON_INTERPRET=1 must be set before triton "
            "is imported)"
        )
    if args.tiny:
        shapes, packed, tokens, lora_ranks = TINY_SHAPES, TINY_PACKED, TINY_TOKENS, TINY_LORA_RANKS
        flora_ranks, flora_dtypes, lora_dtypes = (
            TINY_FLORA_SLOT_RANKS, TINY_FLORA_DTYPES, TINY_LORA_DTYPES,
        )  # fmt: skip
    else:
        shapes, packed, tokens, lora_ranks = layer_bench.SHAPES, PACKED, TOKENS, LORA_RANKS
        flora_ranks, flora_dtypes, lora_dtypes = FLORA_SLOT_RANKS, DTYPES, DTYPES
    ops, utils, lora_source = layer_bench.vllm_triton_lora()
    print(f"device {device}; vLLM's Triton LoRA kernels: {lora_source}")

    gen = torch.Generator(device=device).manual_seed(SEED)
    cases: list[dict[str, Any]] = []

    def record(kind: str, point: dict[str, Any], case: Any, *case_args: Any) -> None:
        t0 = time.perf_counter()
        try:
            res = case(*case_args)
        except Exception as e:  # a failing case is a result, not the end of the check
            res = {"ok": False, "error": repr(e)}
        res["seconds"] = round(time.perf_counter() - t0, 3)
        cases.append({"kernel": kind, **point, **res})
        err = res.get("error") or " ".join(
            f"{k} {v:.2e}" for k, v in res.items() if k.startswith("rel_err")
        )
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {kind:5} {point} {err}")

    layers = {name: (in_f, (out_f,)) for name, (in_f, out_f, _) in shapes.items()}
    for name, (in_f, slice_outs) in {**layers, **packed}.items():
        if name in shapes:
            bias = shapes[name][2]
            for dt_name in flora_dtypes:
                dtype = getattr(torch, dt_name)
                for n_tok in tokens:
                    point = {"shape": name, "dtype": dt_name, "tokens": n_tok}
                    record("flora", point, flora_case, in_f, slice_outs[0], bias, n_tok,
                           flora_ranks, dtype, device, gen)  # fmt: skip
        for dt_name in lora_dtypes:
            dtype = getattr(torch, dt_name)
            for n_tok in tokens:
                for rank in lora_ranks:
                    point = {"shape": name, "slices": list(slice_outs), "dtype": dt_name,
                             "tokens": n_tok, "rank": rank}  # fmt: skip
                    record("lora", point, lora_case, in_f, slice_outs, n_tok, rank, dtype,
                           device, gen, ops, utils)  # fmt: skip
        if cuda:
            torch.cuda.empty_cache()

    failed = [c for c in cases if not c["ok"]]
    tag = common.slug(torch.cuda.get_device_name(device)) if cuda else "cpu-tiny"
    path = args.out if args.out.endswith(".json") else os.path.join(args.out, f"check_{tag}.json")
    common.write_json(path, {
        "kind": "gpu_check",
        "passed": not failed,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "git": common.git_revision(REPO_ROOT),
        "settings": {
            "device": str(device),
            "tiny": args.tiny,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "shapes": {k: {"in": v[0], "out": v[1], "bias": v[2]} for k, v in shapes.items()},
            "packed_lora_layers": {k: {"in": i, "slices": list(o)} for k, (i, o) in packed.items()},
            "tokens": list(tokens),
            "lora_ranks": list(lora_ranks),
            "flora_slot_ranks": list(flora_ranks),
            "flora_dtypes": list(flora_dtypes),
            "lora_dtypes": list(lora_dtypes),
            "tolerance": TOL,
            "lora_scale": LORA_SCALE,
            "seed": SEED,
        },
        "vllm_lora_triton_source": lora_source,
        "cases": cases,
    })  # fmt: skip
    print(f"{len(cases) - len(failed)} of {len(cases)} cases passed; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
