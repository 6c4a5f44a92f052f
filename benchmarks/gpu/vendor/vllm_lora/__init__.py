"""vLLM's Triton LoRA kernels, vendored so the GPU run needs no vLLM (see README.md).

    lora_shrink(x, [A], h, *meta.meta_args(T, False), scale)          h = scale * x A^T
    lora_expand(h, [B], y, *meta.meta_args(T, False), offset_start=0, add_inputs=True)

with `meta = LoRAKernelMeta.make(max_loras, max_tokens, device)` and
`meta.prepare_tensors(token_slots.int())` once per batch, as vLLM's punica wrapper does.
"""

from .lora_expand_op import lora_expand
from .lora_kernel_metadata import LoRAKernelMeta
from .lora_shrink_op import lora_shrink

VLLM_VERSION = "0.32.0"  # the release the files were copied from (their headers say so too)

__all__ = ["VLLM_VERSION", "LoRAKernelMeta", "lora_expand", "lora_shrink"]
