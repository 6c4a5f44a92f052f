"""Fused FLoRA linear in Triton: the same op as `torch_ops.flora_linear`, without its expansion.

Per token x_t served by slot s_t of rank r = slot_ranks[s_t] (s_t = -1 or r = 0: plain token)

    y_t = Σ_{k < r} b_s[k] ∘ (W0 (a_s[k] ∘ x_t)) + bias        (FLoRA token)
    y_t = W0 x_t + bias                                          (plain token)

Identity factors (a = 1, b = 1, rank 1) give back the base output exactly.

The torch form writes the expanded [Σ_t max(r_t, 1), in] input and [.., out] output to memory.
Here one program owns a [BLOCK_M tokens, BLOCK_N outputs] tile and treats the rank as extra
rows held in registers only: row e = k * BLOCK_M + m of its input tile is a_s[k] ∘ x_m, scaled
as it is loaded (a plain token keeps its one unscaled row at k = 0, zeros elsewhere), one
`tl.dot` per K step against the shared W0 tile gives all rank rows at once, and the epilogue
multiplies by b_s[k] and sums the rows of each token. Ranks are walked RANK_CHUNK at a time up
to the largest rank in the token block, read on the device, so W0 is read once per chunk.

Graph safety: the launcher branches on shapes and dtypes only (never on tensor values), the
ranks and slots are read inside the kernel, and no host sync happens, so `flora::flora_linear`
can sit inside torch.compile (`fullgraph=True`) and CUDA graph capture. Padding is harmless:
slots past the end of `token_slots` (shorter than x), slot -1, slot >= S and rank 0 all give
the plain row; a `token_slots` longer than x has its tail ignored; rows k >= rank are never read.

Cost: a block pays for its largest rank (rounded up to RANK_CHUNK) on every token in it, e.g.
one rank-8 token makes its 15 neighbours do 8 rank rows of work. Decode (memory-bound) does not
care; prefill with mixed ranks would gain from grouping tokens by rank first (future work).

Runs in: the worker (CUDA, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.cache
def is_triton_available() -> bool:
    """True when `triton` imports (it may still need a GPU or TRITON_INTERPRET=1 to run)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def interpreter_active() -> bool:
    """True when the kernel runs on CPU tensors under Triton's interpreter.

    TRITON_INTERPRET=1 must be set before triton is first imported: triton builds its own
    `tl.max`, `tl.sum`, ... when imported, and an interpreted kernel cannot call compiled ones.
    """
    if not is_triton_available():
        return False
    import triton.language as tl

    return all(type(f).__name__ == "InterpretedFunction" for f in (tl.standard.max, _kernel()))


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch; picked from shapes only, so a captured graph keeps its own."""

    block_m: int  # tokens per program
    block_n: int  # output features per program
    block_k: int  # input features per dot step
    rank_chunk: int  # rank rows per token held at once: the dot has block_m * rank_chunk rows
    num_warps: int = 4
    num_stages: int = 3


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pick_config(n_tok: int, n_out: int, max_rank: int, dtype: torch.dtype) -> KernelConfig:
    """Untuned heuristic (written without a GPU at hand): a dot of 64-128 rows.

    Decode (n_tok <= 16) is memory-bound: hold up to 8 rank rows per token so W0 is read once.
    Larger batches hold fewer rank rows, so rank-1 tokens waste fewer FLOPs.
    """
    rank_p2 = _next_pow2(max(max_rank, 1))
    block_m = 16 if n_tok <= 16 else 32 if n_tok <= 64 else 64
    rank_chunk = min(rank_p2, max(1, 128 // block_m))
    # Enough programs to fill the GPU: narrow tiles when there are few token blocks.
    block_n = 64 if _cdiv(n_tok, block_m) * _cdiv(n_out, 64) >= 256 else 32
    # fp32 runs the IEEE (FMA) dot: a shorter K step keeps shared memory under 100 KB.
    block_k = 32 if dtype == torch.float32 else 64
    # 128-row dots spill registers at 4 warps (ptxas for sm_90: 255 regs + stack), not at 8.
    num_warps = 8 if block_m * rank_chunk >= 128 else 4
    return KernelConfig(block_m, block_n, block_k, rank_chunk, num_warps=num_warps)


def interpreter_config(n_tok: int, n_out: int, max_rank: int) -> KernelConfig:
    """Large tiles for Triton's interpreter (CPU tensors): it pays per program and per op, not
    per element, so 64 x 256 x 256 tiles run about 40x faster than the GPU tiles there."""
    return KernelConfig(
        block_m=min(64, max(16, _next_pow2(n_tok))),
        block_n=min(256, max(16, _next_pow2(n_out))),
        block_k=256,
        rank_chunk=min(8, _next_pow2(max(max_rank, 1))),
    )


@functools.cache
def _kernel():  # -> triton.JITFunction
    """The jitted kernel, built on first use: importing this module never imports triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def flora_linear_kernel(
        x_ptr,  # [T, in]
        w_ptr,  # [out, in]
        bias_ptr,  # [out] (unused without HAS_BIAS)
        slots_ptr,  # [n_slots] int64, -1 = plain
        a_ptr,  # [S, R, in]
        b_ptr,  # [S, R, out]
        ranks_ptr,  # [S] int64
        y_ptr,  # [T, out]
        T,
        N,
        K,
        S,
        R,
        n_slots,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_slot,
        stride_as,
        stride_ar,
        stride_ak,
        stride_bs,
        stride_br,
        stride_bn,
        stride_rank,
        stride_ym,
        stride_yn,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        RANK_CHUNK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # Row e of the dot is (rank row k = e // BLOCK_M, token m = e % BLOCK_M).
        offs_e = tl.arange(0, RANK_CHUNK * BLOCK_M)
        row_k = offs_e // BLOCK_M  # [E] rank row within the chunk
        offs_m = pid_m.to(tl.int64) * BLOCK_M + offs_e % BLOCK_M  # [E] token (repeats per k)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        m_mask = offs_m < T
        n_mask = offs_n < N

        slot = tl.load(slots_ptr + offs_m * stride_slot, mask=offs_m < n_slots, other=-1)
        in_range = m_mask & (slot >= 0) & (slot < S)
        slot = tl.where(in_range, slot, 0)  # [E]; safe address for masked rows
        rank = tl.load(ranks_ptr + slot * stride_rank, mask=in_range, other=0).to(tl.int32)
        rank = tl.minimum(rank, R)  # never read past the stacked rows
        is_flora = rank > 0  # [E]
        # Rank rows this block walks: the largest rank in it, 1 if it holds only plain tokens.
        n_rows = tl.max(tl.where(m_mask & is_flora, rank, 1), axis=0)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n_rows, RANK_CHUNK):
            k = k0 + row_k  # [E] rank row of each dot row
            use_ab = is_flora & (k < rank)  # [E] FLoRA row k of its token: scaled by a, b
            plain = m_mask & (~is_flora) & (k == 0)  # [E] the one unscaled row of a plain token
            a_rows = a_ptr + slot * stride_as + k * stride_ar  # [E]
            part = tl.zeros([RANK_CHUNK * BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kk0 in range(0, K, BLOCK_K):
                kk = kk0 + offs_k  # [BK]
                k_mask = kk < K
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(use_ab | plain)[:, None] & k_mask[None, :],
                    other=0.0,
                )  # [E, BK]
                a = tl.load(
                    a_rows[:, None] + kk[None, :] * stride_ak,
                    mask=use_ab[:, None] & k_mask[None, :],
                    other=0.0,
                )  # [E, BK]; rows never loaded stay 0
                # a_k ∘ x in the input dtype: the product of two bf16/fp16 values is exact in
                # fp32, so this rounds once, as (fp32 product).to(dtype) would, in fewer registers
                xs = (x * tl.where(plain[:, None], 1.0, a)).to(w_ptr.dtype.element_ty)
                w = tl.load(
                    w_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=n_mask[None, :] & k_mask[:, None],
                    other=0.0,
                )  # [BK, BN] = W0^T tile
                part = tl.dot(xs, w, part, input_precision=DOT_PRECISION)  # [E, BN]
            b = tl.load(
                b_ptr + (slot * stride_bs + k * stride_br)[:, None] + offs_n[None, :] * stride_bn,
                mask=use_ab[:, None] & n_mask[None, :],
                other=0.0,
            )  # [E, BN]
            part = part * tl.where(plain[:, None], 1.0, b.to(tl.float32))  # b_k ∘ (.)
            # Σ over the chunk's rank rows of each token: [RC, BM, BN] -> [BM, BN].
            acc += tl.sum(tl.reshape(part, [RANK_CHUNK, BLOCK_M, BLOCK_N]), axis=0)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        tl.store(
            y_ptr + out_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=(out_m < T)[:, None] & n_mask[None, :],
        )

    return flora_linear_kernel


def flora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_slots: torch.Tensor,
    a_stacked: torch.Tensor,
    b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y = per-token FLoRA linear in one fused kernel; plain tokens get x W0^T + bias.

    Args:
        x: [T, in] activations.
        weight: [out, in] frozen base weight W0, same dtype as x.
        bias: [out] or None.
        token_slots: [>= or < T] int adapter slot per token, -1 for none; tokens past its end
            are plain, entries past T are ignored (CUDA-graph padding either way).
        a_stacked: [S, R, in] input scalings A per slot (rows >= the slot's rank never read).
        b_stacked: [S, R, out] output scalings B^T per slot, `alpha / r` folded in.
        slot_ranks: [S] int rank per slot (may be a strided column); 0 = not FLoRA here.
        config: tile sizes; default `pick_config` from the shapes (`interpreter_config` for
            CPU tensors).
    Returns:
        [T, out] in x's dtype, accumulated in fp32.
    """
    if not is_triton_available():
        raise RuntimeError(
            "flora_linear_triton needs triton; install it or use "
            "flora_vllm.ops.torch_ops.flora_linear"
        )
    if x.device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "flora_linear_triton got CPU tensors, but Triton only runs them under its "
            "interpreter: set TRITON_INTERPRET=1 before triton is first imported, or use "
            "flora_vllm.ops.torch_ops.flora_linear on the CPU"
        )
    n_tok, n_in = x.shape
    n_out = weight.shape[0]
    n_slot, max_rank = a_stacked.shape[0], a_stacked.shape[1]
    y = torch.empty(n_tok, n_out, dtype=x.dtype, device=x.device)  # [T, out]
    if n_tok == 0 or n_out == 0:
        return y
    if config is not None:
        cfg = config
    elif x.device.type == "cpu":
        cfg = interpreter_config(n_tok, n_out, max_rank)
    else:
        cfg = pick_config(n_tok, n_out, max_rank, x.dtype)
    grid = (_cdiv(n_tok, cfg.block_m), _cdiv(n_out, cfg.block_n))
    _kernel()[grid](
        x,
        weight,
        y if bias is None else bias,  # any pointer; never read without HAS_BIAS
        token_slots,
        a_stacked,
        b_stacked,
        slot_ranks,
        y,
        n_tok,
        n_out,
        n_in,
        n_slot,
        max_rank,
        token_slots.shape[0],
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        token_slots.stride(0),
        a_stacked.stride(0),
        a_stacked.stride(1),
        a_stacked.stride(2),
        b_stacked.stride(0),
        b_stacked.stride(1),
        b_stacked.stride(2),
        slot_ranks.stride(0),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32: no TF32 rounding
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        RANK_CHUNK=cfg.rank_chunk,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


@torch.library.custom_op(
    "flora::flora_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor token_slots, Tensor a_stacked, "
    "Tensor b_stacked, Tensor slot_ranks) -> Tensor",
)
def flora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_slots: torch.Tensor,
    a_stacked: torch.Tensor,
    b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
) -> torch.Tensor:
    """`torch.ops.flora.flora_linear`: the fused kernel as one opaque node for torch.compile."""
    return flora_linear_triton(x, weight, bias, token_slots, a_stacked, b_stacked, slot_ranks)


@flora_linear_op.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_slots: torch.Tensor,
    a_stacked: torch.Tensor,
    b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])  # [T, out]
