"""vLLM `general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations

GPT_BIGCODE = "GPTBigCodeForCausalLM"


def register() -> None:
    """Install the FLoRA hooks and the native StarCoder (GPTBigCode) model; idempotent."""
    from vllm import ModelRegistry

    from flora_vllm.vllm_hooks import apply_hooks

    apply_hooks()
    # Stock 0.29 runs GPTBigCode through its Transformers backend, where no LoRA layer wraps
    # c_attn; our native model packs it as a QKV layer that LoRA and FLoRA both adapt.
    ModelRegistry.register_model(GPT_BIGCODE, "flora_vllm.models.gpt_bigcode:GPTBigCodeForCausalLM")
