"""flora-vllm: FLoRA adapters (W_i = W0 ∘ (B_i A_i), one shared matmul per batch) served by vLLM.

The FLoRA math (`flora_vllm.ops`, `flora_vllm.adapter`) imports no vLLM; everything that touches
vLLM's internals lives in `flora_vllm.vllm_hooks`, installed by the `vllm.general_plugins` entry
point `flora_vllm.plugin:register`.
"""

__version__ = "0.1.0"
