"""vLLM `general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations

import logging
import os

GPT_BIGCODE = "GPTBigCodeForCausalLM"


def _log_like_vllm() -> None:
    """Route the `flora_vllm` logger through vLLM's handlers, so our lines (hooks installed,
    cost model calibrated) appear in the server log with vLLM's format."""
    ours, vllm_logger = logging.getLogger("flora_vllm"), logging.getLogger("vllm")
    if not ours.handlers and vllm_logger.handlers:
        for handler in vllm_logger.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllm_logger.level or logging.INFO)
        ours.propagate = False


def register() -> None:
    """Install the FLoRA hooks and the native StarCoder (GPTBigCode) model; idempotent.

    The plugin loads in every vLLM process of the environment, FLoRA wanted or not, so it must
    never stop vLLM from starting: with FLORA_DISABLE=1, or a vLLM other than the pinned one,
    it logs why and leaves vLLM untouched (stock vLLM then refuses FLoRA folders loudly).
    `flora-vllm serve` checks the version itself and refuses to start on a mismatch."""
    from vllm import ModelRegistry

    from flora_vllm.config import get_config
    from flora_vllm.hooks import apply_hooks, vllm_problems

    _log_like_vllm()
    log = logging.getLogger("flora_vllm")
    if os.environ.get("FLORA_DISABLE") == "1":
        log.warning("flora_vllm: FLORA_DISABLE=1, the plugin is off (vLLM runs unchanged)")
        return
    if problems := vllm_problems():
        log.error(
            "flora_vllm is OFF, vLLM runs unchanged (FLoRA adapters will be refused):\n  - %s",
            "\n  - ".join(problems),
        )
        return
    get_config()  # a bad FLORA_* setting fails here, at start-up, in every process
    apply_hooks()
    from flora_vllm.serving.resolver import register_resolver

    register_resolver()  # with adapter roots: unknown model names served from them
    # Stock 0.29 runs GPTBigCode through its Transformers backend, where no LoRA layer wraps
    # c_attn; our native model packs it as a QKV layer that LoRA and FLoRA both adapt.
    ModelRegistry.register_model(GPT_BIGCODE, "flora_vllm.models.gpt_bigcode:GPTBigCodeForCausalLM")
