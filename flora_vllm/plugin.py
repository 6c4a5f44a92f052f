"""vLLM `general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations

import logging
import os

GPT_BIGCODE = "GPTBigCodeForCausalLM"


class _ToVllmLogger(logging.Handler):
    """Hands each `flora_vllm` record to vLLM's logger's handlers at emit time, so our lines
    appear in the server log with vLLM's format in every process, including those where vLLM
    sets its handlers up only after the plugin registered (vLLM 0.32's API server)."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if vllm_logger.isEnabledFor(record.levelno):
            vllm_logger.handle(record)


def _log_like_vllm() -> None:
    """Route the `flora_vllm` logger through vLLM's handlers (hooks installed, cost model
    calibrated, adapters released): INFO and up, formatted as vLLM's own lines."""
    ours = logging.getLogger("flora_vllm")
    if not any(isinstance(h, _ToVllmLogger) for h in ours.handlers):
        ours.addHandler(_ToVllmLogger())
        ours.setLevel(logging.INFO)
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
