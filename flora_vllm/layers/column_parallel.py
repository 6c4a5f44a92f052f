"""Column-parallel families with FLoRA (worker process): one weight (StarCoder `c_fc`), packed
slices (LLaMA `gate_up_proj`), and the qkv layers, whose outputs never carry NaN/inf into the
KV cache. As vLLM's `vllm/lora/layers/column_parallel_linear.py`, one file for the family."""

from __future__ import annotations

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
)

from flora_vllm.layers.base import FLoRALinearMixin


class ColumnParallelLinearWithFLoRA(FLoRALinearMixin, ColumnParallelLinearWithLoRA):
    """One column-parallel weight (StarCoder `c_fc`)."""

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        return [(self.base_layer.output_size, self.base_layer.input_size)]


class MergedColumnParallelLinearWithFLoRA(FLoRALinearMixin, MergedColumnParallelLinearWithLoRA):
    """Packed column weights, one FLoRA per slice (LLaMA `gate_up_proj` = gate + up)."""

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        return [(out, self.base_layer.input_size) for out in self.base_layer.output_sizes]


class FiniteKVMixin:
    """qkv layers: NaN/inf never reach the KV cache. An adapter whose activations overflow must
    spoil its own answers only; vLLM's CPU attention reads stale positions of a reused KV block
    with weight 0, and 0 × NaN would hand the next tenant NaN (tests: test_bad_input)."""

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        output = super().apply(x, bias)  # type: ignore[misc]
        if torch.compiler.is_compiling():  # the opaque node, whose body is this whole method
            return output
        n_tok = output.numel() // output.shape[-1]
        if self.step_counts(n_tok)[0] == n_tok and not x.is_cuda:  # no adapter token: as base
            return output
        return torch.nan_to_num_(output)


class QKVParallelLinearWithFLoRA(FiniteKVMixin, FLoRALinearMixin, QKVParallelLinearWithLoRA):
    """A fused qkv weight that adapters treat as one module (StarCoder `c_attn`)."""

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        out = self.q_proj_total_size + 2 * self.kv_proj_total_size
        return [(out, self.base_layer.input_size)]


class MergedQKVParallelLinearWithFLoRA(
    FiniteKVMixin, FLoRALinearMixin, MergedQKVParallelLinearWithLoRA
):
    """q, k, v packed into one weight, one FLoRA per slice (LLaMA `qkv_proj`)."""

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        layer = self.base_layer
        q = layer.total_num_heads * layer.head_size
        kv = layer.total_num_kv_heads * layer.head_size
        return [(q, layer.input_size), (kv, layer.input_size), (kv, layer.input_size)]
