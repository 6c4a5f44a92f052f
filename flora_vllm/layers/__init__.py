"""vLLM linear LoRA layers that also serve FLoRA adapters, slot by slot (worker process).

Each `<Base>WithFLoRA` extends vLLM's own `<Base>WithLoRA` with the shared verbs of
`base.FLoRALinearMixin`; one file per vLLM base-layer family, as in vLLM's `vllm/lora/layers/`:

    base.py             FLoRALinearMixin: slots, set_flora / reset_flora, the mixed-batch apply
    column_parallel.py  ColumnParallel, MergedColumnParallel, QKV, MergedQKV (+ finite KV)
    row_parallel.py     RowParallel
"""

from __future__ import annotations

from flora_vllm.layers.base import FLoRALinearMixin
from flora_vllm.layers.column_parallel import (
    ColumnParallelLinearWithFLoRA,
    MergedColumnParallelLinearWithFLoRA,
    MergedQKVParallelLinearWithFLoRA,
    QKVParallelLinearWithFLoRA,
)
from flora_vllm.layers.row_parallel import RowParallelLinearWithFLoRA

# Order matters as in vllm.lora.utils._all_lora_classes: each is tried before vLLM's classes.
FLORA_LAYER_CLASSES: tuple[type[FLoRALinearMixin], ...] = (
    ColumnParallelLinearWithFLoRA,
    MergedColumnParallelLinearWithFLoRA,
    QKVParallelLinearWithFLoRA,
    MergedQKVParallelLinearWithFLoRA,
    RowParallelLinearWithFLoRA,
)

__all__ = [
    "FLORA_LAYER_CLASSES",
    "ColumnParallelLinearWithFLoRA",
    "FLoRALinearMixin",
    "MergedColumnParallelLinearWithFLoRA",
    "MergedQKVParallelLinearWithFLoRA",
    "QKVParallelLinearWithFLoRA",
    "RowParallelLinearWithFLoRA",
]
