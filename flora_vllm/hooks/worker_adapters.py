"""Worker process: adapter folders become vLLM adapter models, and slots take FLoRA factors.

Runs where vLLM's model runner lives (the worker; the engine core on a single-process CPU
server). Hooks (targets checked in `flora_vllm.hooks`):

- `vllm.lora.utils._all_lora_classes`: the FLoRA layer wrappers, tried before vLLM's own.
- `WorkerLoRAManager._load_adapter`: reads the API server's copy of the folder
  (`serving.copies`: never the client's folder, which may hang or change); folders holding
  anything but files and folders (a FIFO, a device) are refused before anything is opened;
  FLoRA folders load as FLoRAModel, PEFT IA3 folders as a rank-1 one (`adapter.ia3`), PEFT
  DoRA folders as vLLM's LoRAModel (read by vLLM's loader from a plain-LoRA copy, B rows scaled)
  carrying rank-1 output factors in `flora` (`adapter.dora`); LoRA
  folders are checked from their safetensors header
  first (`adapter.lora`: complete modules, exact shapes, a byte limit); unknown peft_type values
  are refused (stock vLLM applies them as additive LoRA); LoRA weights with NaN/inf are refused;
  paths outside FLORA_ADAPTER_ROOTS are refused; load errors carry a 4xx marker.
- `LoRAModelManager._add_adapter`: a FLoRA model skips LoRA's packing step (nothing to pack).
- `LRUCacheWorkerLoRAManager.add_adapter`: a step's adapter already held is touched and
  activated in O(1) (stock vLLM copies every registered id per adapter per step).
- `LoRAModelManager.activate_adapter`: filling a slot also sets or clears its FLoRA factors (a
  LoRAModel with `flora`, DoRA, keeps its LoRA part applied in the slot too); LoRA
  weights that do not fit the layers free the slot and are a 400, not an engine error.
- `WorkerWrapperBase.flora_lora_residency` (added): the collective RPC behind the residency
  gauge; reads the LoRA manager's `_adapter_manager`, `lora_index_to_id`, `_registered_adapters`.
- Test seam, only with FLORA_TEST_LOAD_FAULT set: the load of a named adapter raises
  MemoryError or RuntimeError.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from flora_vllm.adapter import (
    DORA_KIND,
    PEFT_TYPE,
    AdapterResourcesError,
    FLoRAAdapterError,
    FLoRAAdapterNotFoundError,
    folder_problems,
    load_adapter,
    peft_type_and_problem,
)
from flora_vllm.adapter.dora import (
    DoRAAdapter,
    parse_dora,
    read_dora,
    row_norms_sq,
    with_scales,
    write_plain_lora,
)
from flora_vllm.adapter.ia3 import PEFT_TYPE_IA3, load_ia3
from flora_vllm.adapter.lora import lora_problems
from flora_vllm.config import get_config
from flora_vllm.ops.torch_ops import factor_dtype
from flora_vllm.serving.access import check_adapter_path
from flora_vllm.serving.copies import is_copy

logger = logging.getLogger("flora_vllm")


# --- adapter loading -------------------------------------------------------------------------


def _with_flora_layer_classes(stock: Any) -> tuple:
    """vLLM's LoRA layer classes with the FLoRA ones first (`from_layer` tries them in order)."""
    from flora_vllm.layers import FLORA_LAYER_CLASSES

    return FLORA_LAYER_CLASSES + tuple(stock)


class FLoRAModelMixin:
    """Marks a LoRAModel as FLoRA; `flora` maps vLLM module name -> per-slice (a, b,
    bias_scale) lists (`FLoRALinearMixin.set_flora`'s arguments)."""

    flora: dict[str, tuple[list[torch.Tensor | None], ...]]


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


def _file_names_to_model(manager: Any) -> Callable[[str], str | None] | None:
    """Maps a module path of an adapter file to the served model's name (None: the same)."""
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    return mapper.get_rename_mapper()._map_name if mapper is not None else None


def _check_lora_header(worker_manager: Any, label: str, lora_path: str) -> None:
    """Refuse a LoRA folder from its safetensors header (every module complete, shapes exact
    for the served layers, declared size within FLORA_MAX_ADAPTER_MB) before vLLM reads it."""
    manager = worker_manager._adapter_manager
    shapes, _ = flora_module_index(manager)
    limit = get_config().max_adapter_mb * 2**20
    if problems := lora_problems(lora_path, shapes, limit, _file_names_to_model(manager)):
        raise FLoRAAdapterError(label, problems)


def _served_dtype(manager: Any, where: dict[str, tuple[str, int, int]]) -> torch.dtype:
    """The wrapped layers' weight dtype (fp32 when no layer is wrapped)."""
    if not where:
        return torch.float32
    return manager.modules[next(iter(where.values()))[0]].base_layer.weight.dtype


def _as_flora_model(lora_id: int, rank: int, weights: dict, where: dict) -> Any:
    """Per-module factors -> a FLoRAModel whose `flora` holds per-slice (a, b, bias_scale)
    lists of each wrapped vLLM module (None: that slice is not adapted)."""
    flora: dict[str, tuple[list, list, list]] = {}
    for sub, w in weights.items():
        name, i, n = where[sub]
        a_list, b_list, s_list = flora.setdefault(name, ([None] * n, [None] * n, [None] * n))
        a_list[i], b_list[i], s_list[i] = w.a, w.b, w.bias_scale
    return _flora_model_cls()(lora_id, rank, flora)


def _load_flora(worker_manager: Any, lora_request: Any, lora_path: str) -> Any:
    """Read, check and arrange a FLoRA folder for the wrapped modules of the served model."""
    manager = worker_manager._adapter_manager
    shapes, where = flora_module_index(manager)
    dtype = _served_dtype(manager, where)
    max_rank, rank_setting = get_config().rank_limit(worker_manager.lora_config.max_lora_rank)
    cfg, weights = load_adapter(
        lora_path,
        shapes,
        max_rank=max_rank,
        rank_setting=rank_setting,
        dtype=factor_dtype(dtype),  # fp32 for a bf16 model: see ops.torch_ops.factor_dtype
        map_name=_file_names_to_model(manager),
        serve_dtype=dtype,
    )
    return _as_flora_model(lora_request.lora_int_id, cfg.r, weights, where)


def _load_ia3(worker_manager: Any, lora_request: Any, lora_path: str) -> Any:
    """A PEFT IA3 folder as a rank-1 FLoRA adapter (`adapter.ia3`)."""
    manager = worker_manager._adapter_manager
    shapes, where = flora_module_index(manager)
    biased = {
        sub for sub, (name, _, _) in where.items()
        if getattr(manager.modules[name].base_layer, "bias", None) is not None
    }
    weights = load_ia3(
        lora_path,
        shapes,
        biased,
        dtype=factor_dtype(_served_dtype(manager, where)),
        map_name=_file_names_to_model(manager),
    )
    return _as_flora_model(lora_request.lora_int_id, 1, weights, where)


def _base_weights(manager: Any, where: dict[str, tuple[str, int, int]]) -> dict[str, torch.Tensor]:
    """Sub-module name -> its rows of the wrapped layer's base weight (views, no copy)."""
    weights = {}
    for sub, (name, i, _) in where.items():
        module = manager.modules[name]
        start = sum(module.output_slices[:i])
        weights[sub] = module.base_layer.weight[start : start + module.output_slices[i]]
    return weights


def _tp_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over this worker's tensor-parallel group, on its CPU (gloo) group: every rank
    loads an adapter in the same step (vLLM broadcasts the step), so every rank calls this."""
    from vllm.distributed.parallel_state import get_tp_group

    torch.distributed.all_reduce(t, group=get_tp_group().cpu_group)
    return t


def _shard_index(module: Any, i: int, n: int, out_f: int, in_f: int) -> tuple[torch.Tensor, ...]:
    """The rows and columns of slice i's whole weight that this rank's shard holds, in its
    order: vLLM's own `slice_lora_b` / `slice_lora_a` applied to index vectors."""
    rows = torch.arange(out_f, dtype=torch.float64)[:, None]
    cols = torch.arange(in_f, dtype=torch.float64)[None, :]
    if n == 1:
        rows, cols = module.slice_lora_b(rows), module.slice_lora_a(cols)
    else:
        rows = module.slice_lora_b([rows if j == i else None for j in range(n)])[i]
        cols = module.slice_lora_a([cols if j == i else None for j in range(n)])[i]
    return rows[:, 0].long(), cols[0].long()


def _dora_tp(label: str, read: Callable[[], DoRAAdapter], manager: Any, where: dict,
             shapes: dict) -> DoRAAdapter:
    """DoRA under tensor parallelism: each rank sums the squares of its shard's part of every
    row (its rows, its columns), the ranks add them up (`_tp_sum`), and replicated shards (kv
    heads when ranks outnumber them) count once. Every rank calls `_tp_sum` exactly twice,
    whatever fails: a rank that cannot read the folder must not leave the others waiting."""
    error: BaseException | None = None
    try:
        dora = read()
    except Exception as e:  # raised below, after the others heard of it
        error = e
    if float(_tp_sum(torch.tensor([float(error is not None)], dtype=torch.float64))[0]) > 0:
        raise error or FLoRAAdapterError(label, ["another tensor-parallel worker could not read "
                                                 "this adapter (see its log)"])
    base = _base_weights(manager, where)
    paths = sorted(dora.modules)
    parts, fracs = [], []
    for path in paths:
        name, i, n = where[path]
        out_f, in_f = shapes[path]
        rows, cols = _shard_index(manager.modules[name], i, n, out_f, in_f)
        if base[path].shape != (len(rows), len(cols)):
            raise FLoRAAdapterError(label, [
                f"{path}: this worker's shard of W0 is {list(base[path].shape)}, but vLLM's "
                f"slicing gives {len(rows)} rows x {len(cols)} columns"
            ])
        part = torch.zeros(out_f, dtype=torch.float64)
        part[rows] = row_norms_sq(dora.modules[path], base[path], rows, cols)
        frac = torch.zeros(out_f, dtype=torch.float64)
        frac[rows] = len(cols) / in_f  # a rank holding whole rows counts 1 for each of them
        parts.append(part)
        fracs.append(frac)
    total = _tp_sum(torch.cat(parts + fracs))
    sizes = [shapes[p][0] for p in paths]
    sums, counts = total.split([sum(sizes)] * 2)
    norms = dict(zip(paths, (sums / counts).split(sizes), strict=True))
    return with_scales(label, dora, norms)


def _load_dora(worker_manager: Any, lora_request: Any, lora_path: str, orig: Callable) -> Any:
    """A PEFT DoRA folder (`adapter.dora`): vLLM's own loader reads its LoRA part from a plain
    LoRA copy (vLLM refuses DoRA), each module's B rows are scaled by s, and s rides along as
    rank-1 FLoRA output factors (`flora`: a = 1, b = s) that the slot applies with the LoRA.
    Under tensor parallelism s comes from every rank's shard (`_dora_tp`)."""
    import msgspec

    label = f"'{lora_request.lora_name}' ({lora_request.lora_path})"
    manager = worker_manager._adapter_manager
    shapes, where = flora_module_index(manager)
    names = _file_names_to_model(manager)
    tp = max((getattr(manager.modules[n], "tp_size", 1) for n, _, _ in where.values()), default=1)

    def read() -> DoRAAdapter:
        _check_lora_header(worker_manager, label, lora_path)
        return parse_dora(lora_path, shapes, names)

    if tp > 1:
        dora = _dora_tp(label, read, manager, where, shapes)
    else:
        _check_lora_header(worker_manager, label, lora_path)
        dora = read_dora(lora_path, _base_weights(manager, where), names)
    with tempfile.TemporaryDirectory(prefix="flora-dora-") as plain:
        write_plain_lora(dora, plain)
        try:
            lora = orig(worker_manager, msgspec.structs.replace(lora_request, lora_path=plain))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # vLLM's checks: a 400
            reason = str(e).replace(plain, lora_path)  # name the folder, not the copy
            raise FLoRAAdapterError(label, [f"{type(e).__name__}: {reason}"]) from e
    _check_lora_finite(label, lora)
    dtype = factor_dtype(_served_dtype(manager, where))
    flora: dict[str, tuple[list, list]] = {}
    for sub, s in dora.scales.items():
        weights = lora.loras.get(sub)
        if weights is None:  # vLLM dropped the module: its s would scale the base alone
            raise FLoRAAdapterError(label, [f"vLLM's loader kept no LoRA weights for {sub!r}"])
        b = weights.lora_b  # [out, r], scaling not folded yet (vLLM folds it when packing)
        b.copy_(b.float() * s[:, None])
        name, i, n = where[sub]
        a_list, b_list = flora.setdefault(name, ([None] * n, [None] * n))
        a_list[i] = torch.ones(1, shapes[sub][1], dtype=dtype)
        b_list[i] = s.to(dtype).reshape(-1, 1)
    lora.flora = flora  # a LoRAModel still: vLLM packs its LoRA part as usual
    return lora


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
            if not is_copy(path):  # the API server's copy of a checked folder, or the LLM class
                check_adapter_path(path, get_config().adapter_roots)
            try:
                abs_path = get_adapter_absolute_path(path)
            except FileNotFoundError as e:  # e.g. a hub id with no network: stock vLLM says 404
                raise LoRAAdapterNotFoundError(name, path) from e
            # Nothing is opened before every entry is known to be a file: a FIFO would block
            # this engine step, and every tenant's requests with it.
            if problems := folder_problems(abs_path):
                raise FLoRAAdapterError(label, problems)
            peft_type, problem = peft_type_and_problem(abs_path)
            if problem is not None:
                raise FLoRAAdapterError(label, [problem])
            if peft_type == PEFT_TYPE:
                return _load_flora(self, lora_request, abs_path)
            if peft_type == PEFT_TYPE_IA3:
                return _load_ia3(self, lora_request, abs_path)
            if peft_type == DORA_KIND:
                return _load_dora(self, lora_request, abs_path, orig)
            if peft_type not in (None, "LORA"):
                raise FLoRAAdapterError(
                    label,
                    [
                        f"unknown peft_type {peft_type!r}: this server serves 'LORA', "
                        f"'{PEFT_TYPE_IA3}' and '{PEFT_TYPE}' adapters only"
                    ],
                )
            _check_lora_header(self, label, abs_path)
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


def _wrap_lru_add_adapter(orig: Callable) -> Callable:
    """A step's adapter that the worker already holds: touch and activate it, as stock vLLM
    does, without `list_adapters()`, which copies every registered id into a new set for each
    adapter of each step (O(in step x registered): 3 s of a 28 s run at 256 distinct adapters
    per step, 256 registered, found by profiling `benchmarks/tenants_bench.py`'s traffic)."""
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

    @functools.wraps(orig)
    def add_adapter(self: Any, lora_request: Any) -> bool:
        manager, lora_id = self._adapter_manager, lora_request.lora_int_id
        if lora_request.load_inplace or lora_id not in manager._registered_adapters:
            return orig(self, lora_request)  # a load (and maybe an eviction): vLLM's own path
        with gpu_sync_allowed():
            loaded = manager.get_adapter(lora_id) is not None  # moves it up in the LRU
            manager.activate_adapter(lora_id)
        return loaded

    return add_adapter


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
            model = self._registered_adapters[lora_id]
            flora = getattr(model, "flora", {})
            keep_lora = not isinstance(model, FLoRAModelMixin)  # DoRA: its LoRA part applies too
            for name, module in self.modules.items():
                if not isinstance(module, FLoRALinearMixin):
                    continue
                if name in flora:
                    module.set_flora(index, *flora[name], keep_lora=keep_lora)
                else:
                    module.reset_flora(index)
        return activated

    return activate_adapter


RESIDENCY_RPC = "flora_lora_residency"  # method the plugin adds to vLLM's worker wrapper


def worker_lora_residency(worker: Any) -> list[tuple[int, str]]:
    """Runs in each worker (collective RPC): (adapter id, "device" | "host") for every adapter
    the worker holds; device = in a slot the batch reads, host = in the LRU cache only."""
    manager = worker.model_runner.lora_manager._adapter_manager
    slots = {i for i in manager.lora_index_to_id if i is not None}
    return [(i, "device" if i in slots else "host") for i in list(manager._registered_adapters)]
