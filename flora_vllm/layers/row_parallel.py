"""Row-parallel layers with FLoRA (worker process): `o_proj`, `down_proj`, StarCoder `c_proj`."""

from __future__ import annotations

from vllm.lora.layers import RowParallelLinearWithLoRA

from flora_vllm.layers.base import FLoRALinearMixin


class RowParallelLinearWithFLoRA(FLoRALinearMixin, RowParallelLinearWithLoRA):
    """Row-parallel weight (`o_proj`, `down_proj`, StarCoder `c_proj`); the bias is added after
    the all-reduce by vLLM, and Σ_k b_k ∘ (.) commutes with that sum over input shards."""

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        return [(self.base_layer.output_size, self.base_layer.input_size)]
