"""Merged FLoRA weights kept across forward passes under a byte budget (pure torch; the worker).

The per-segment policy (`policy.py`) may run an adapter's tokens through W0 ∘ (B^T A); building
that weight costs about (r + 1) weight-sized passes, so a merged weight that the next steps
reuse is kept here (LRU), sized by FLORA_MERGE_CACHE_MB.
"""

from __future__ import annotations

from flora_vllm.ops.torch_ops import Gemm


class MergedWeightCache:
    """Merged-weight GEMMs (W0 ∘ (B^T A), packed) kept across forward passes under a byte
    budget (LRU); callers give each entry's size in bytes.

    Keys are (layer key, slice, slot, slot version): a slot that gets another adapter bumps its
    version (and `drop` frees the stale entries at once), so a stale weight is never served.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._entries: dict[tuple, tuple[Gemm, int]] = {}  # insertion order = LRU order

    def get(self, key: tuple) -> Gemm | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._entries[key] = entry  # most recently used
        return entry[0]

    def put(self, key: tuple, gemm: Gemm, size: int) -> None:
        if size > self.budget:
            return
        while self.used + size > self.budget and self._entries:
            self.used -= self._entries.pop(next(iter(self._entries)))[1]
        self._entries[key] = (gemm, size)
        self.used += size

    def drop(self, layer_key: int, slot: int) -> None:
        for key in [k for k in self._entries if k[0] == layer_key and k[2] == slot]:
            self.used -= self._entries.pop(key)[1]
