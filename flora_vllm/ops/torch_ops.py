"""FLoRA math in plain torch (no vLLM import): the per-token batched form and its dense oracle.

An adapter i turns a frozen weight W0 into W_i = W0 ∘ (B_i A_i) (element-wise; B_i already
carries the `alpha / r` scale). Per token x_t served by adapter s_t of rank r_s this is

    y_t = Σ_{k < r_s} B_s[:, k] ∘ (W0 (A_s[k] ∘ x_t)) + bias

so a whole mixed batch costs ONE dense matmul of Σ_t max(r_{s_t}, 1) rows against W0: each
FLoRA token contributes r_s rows (its input scaled by A_s[k]), each plain token one unscaled row.
Identity factors (A = 1, B = 1, rank 1) give back the base output exactly.

Runs in: the worker (every FLoRA layer call on the CPU) and the trainer (autograd through it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Gemm = Callable[[torch.Tensor], torch.Tensor]
"""x [m, in] -> x W^T [m, out] for one fixed weight W (e.g. vLLM's packed CPU GEMM)."""


def factor_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype FLoRA factors are kept and applied in: float32 for 16-bit models. In bf16,
    numbers near 1 are 2^-7 apart, so a trained change of a few tenths of a percent in a factor
    would round away; kept in fp32, each product rounds once, as a merged weight does."""
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


def linear_gemm(weight: torch.Tensor) -> Gemm:
    """The plain `F.linear` GEMM of a weight (the default; any device)."""
    return lambda x: torch.nn.functional.linear(x, weight)


def expand_rows(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the expanded matmul: which token and which rank component each row carries.

    Args:
        token_slots: [T] int, adapter slot per token, -1 for a plain (base or LoRA) token.
        slot_ranks: [S] int, FLoRA rank of each slot, 0 where the slot holds no FLoRA here.
    Returns:
        row_token [R], row_k [R] and row_is_flora [R] (bool), R = Σ_t max(rank_t, 1).
    """
    return _rows_of(token_ranks(token_slots, slot_ranks))


def token_ranks(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> torch.Tensor:
    """[T] FLoRA rank of each token's adapter at this weight, 0 for a plain token."""
    return torch.where(token_slots >= 0, slot_ranks[token_slots.clamp(min=0)], 0)


def _rows_of(tok_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows = tok_rank.clamp(min=1)  # a plain token keeps exactly one row
    row_token = torch.repeat_interleave(torch.arange(len(n_rows), device=n_rows.device), n_rows)
    row_start = torch.cumsum(n_rows, 0) - n_rows  # [T] first row of each token
    row_k = torch.arange(len(row_token), device=n_rows.device) - row_start[row_token]
    row_is_flora = tok_rank[row_token] > 0
    return row_token, row_k, row_is_flora


def flora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_slots: torch.Tensor,
    a_stacked: torch.Tensor,
    b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    gemm: Gemm | None = None,
) -> torch.Tensor:
    """y = per-token FLoRA linear; plain tokens (slot -1 or rank 0) get x W0^T + bias.

    Args:
        x: [T, in] activations.
        weight: [out, in] frozen base weight W0.
        bias: [out] or None, added once per token (FLoRA leaves the bias unchanged).
        token_slots: [T] int64 adapter slot per token, -1 for none.
        a_stacked: [S, R, in] input scalings A per slot (rows >= the slot's rank unused).
        b_stacked: [S, R, out] output scalings B^T per slot, `alpha / r` folded in.
        slot_ranks: [S] int64 rank per slot; 0 = this slot is not FLoRA for this weight.
        gemm: how to multiply rows by W0 (default `F.linear`); same answer, maybe faster.
    Returns:
        [T, out] in x's dtype. Work follows each adapter's own rank, not the padded R. Factors
        may be wider than x (fp32 for a bf16 model): each scaled row rounds once to x's dtype
        for the matmul, and rank rows are summed in the factors' dtype, rounded once.
    """
    gemm = gemm or linear_gemm(weight)
    safe = token_slots.clamp(min=0)
    tok_rank = token_ranks(token_slots, slot_ranks)  # [T]
    max_rank = int(tok_rank.max()) if len(tok_rank) else 0  # one host sync (CPU path)
    if max_rank == 0:  # no FLoRA token here: the base layer
        return _add_bias(gemm(x), bias)
    if max_rank == 1:  # rank-1 tokens only: scale rows in place of expanding them
        is_flora = (tok_rank > 0).unsqueeze(1)  # [T, 1]
        y = gemm(torch.where(is_flora, x * a_stacked[safe, 0], x).to(x.dtype))  # [T, out]
        return _add_bias(torch.where(is_flora, y * b_stacked[safe, 0], y).to(x.dtype), bias)

    row_token, row_k, row_is_flora = _rows_of(tok_rank)
    flora_rows = row_is_flora.nonzero().squeeze(1)  # [F]
    flora_slot = token_slots[row_token[flora_rows]]  # [F]
    flora_k = row_k[flora_rows]  # [F]

    rows_x = x[row_token]  # [R, in]
    rows_x[flora_rows] *= a_stacked[flora_slot, flora_k]  # input scaling a_k ∘ x
    acc = torch.promote_types(x.dtype, b_stacked.dtype)  # fp32 for a bf16 model, fp32 factors
    rows_y = gemm(rows_x).to(acc)  # [R, out]: the one shared matmul
    rows_y[flora_rows] *= b_stacked[flora_slot, flora_k]  # output scaling b_k ∘ (.)
    y = torch.zeros(x.shape[0], rows_y.shape[1], dtype=acc, device=rows_y.device)
    y.index_add_(0, row_token, rows_y)  # Σ over each token's rank rows
    return _add_bias(y.to(x.dtype), bias)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)


def dense_flora_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The merged weight W0 ∘ (B @ A): the oracle the batched form must equal.

    Args:
        weight: [out, in]; a: [r, in]; b: [out, r] with the `alpha / r` scale folded in.
    """
    return weight * (b @ a)


def merge_slot(
    weight: torch.Tensor, a_stacked: torch.Tensor, b_stacked: torch.Tensor, slot: int, rank: int
) -> torch.Tensor:
    """W0 ∘ (B^T A) for one slot of the stacks: [out, in] in W0's dtype (rounded once), the
    adapter's own merged weight."""
    merged = dense_flora_weight(weight, a_stacked[slot, :rank], b_stacked[slot, :rank].T)
    return merged.to(weight.dtype)


def flora_linear_segments(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_slots: torch.Tensor,
    a_stacked: torch.Tensor,
    b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    merged: dict[int, Gemm],
    gemm: Gemm | None = None,
) -> torch.Tensor:
    """`flora_linear`, except that the tokens of each slot in `merged` run through that slot's
    merged-weight GEMM (one plain matmul per such segment) instead of expanded rows."""
    if not merged:
        return flora_linear(x, weight, bias, token_slots, a_stacked, b_stacked, slot_ranks, gemm)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for slot, gemm_s in merged.items():
        idx = (token_slots == slot).nonzero().squeeze(1)  # [n_s]
        y[idx] = _add_bias(gemm_s(x[idx]), bias)
        rest[idx] = False
    idx = rest.nonzero().squeeze(1)
    if len(idx):
        y[idx] = flora_linear(
            x[idx], weight, bias, token_slots[idx], a_stacked, b_stacked, slot_ranks, gemm
        )
    return y
