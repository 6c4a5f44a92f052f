"""Worker process: what one step costs and computes with adapters on (vLLM's LoRA step).

Runs in the worker, once per step or per layer call. Hooks (targets checked in
`flora_vllm.hooks`):

- `vllm.lora.ops.torch_ops` bgmv ops (CPU punica): a token with slot -1 indexed the last slot's
  weights (a cross-tenant leak); now such tokens get exactly no LoRA (not even 0 × NaN), and
  vLLM's prompt-logprobs call (one request's rows, per-request indices) no longer crashes.
- `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`: on the CPU with LoRA on,
  keep the unpacked weight next to vLLM's packed one (FLoRA merges read it) instead of freeing it.
- `InputBatch.make_lora_inputs` (V1 runner) and `LoraState.get_activate_loras` (V2 runner,
  CUDA's default), vLLM <= 0.33: the step's adapters distinct by id; stock vLLM puts them in a
  set that compares by *name*, so an old and a new id of a reloaded adapter in one batch
  collapse, one is never activated, and `convert_mapping` kills the engine (KeyError). vLLM
  0.34 compares LoRARequest by (name, id) itself.
- `punica_base.convert_mapping` (vectorized: Python work per distinct adapter, not per token),
  `PunicaWrapperBase.update_metadata` and `PunicaWrapperGPU.update_metadata` (the step's
  tokens per slot, on the host, from the mapping: no device sync), and
  `LogitsProcessorWithLoRA` / `VocabParallelEmbeddingWithLoRA` (`set_lora` / `reset_lora` /
  `_get_logits` / `forward`: the lm_head and embedding LoRA only while some slot has such
  weights): what adapter mode costs requests that use no adapter.
- Used by the FLoRA layers (`step_host_counts`, `step_slots`, `slots_buffer`, `cpu_linear`,
  `make_gemm`, `lora_on_output`): the punica wrapper's `token_lora_indices` /
  `_token_lora_indices`, the CPU linear layer's `cpu_linear`, and vLLM's
  `_apply_lora_to_output`, so that `flora_vllm.layers` touches no private vLLM name itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("flora_vllm")


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
    from vllm.config import get_current_vllm_config_or_none

    @functools.wraps(orig)
    def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool) -> None:
        config = get_current_vllm_config_or_none()  # None outside an engine: stock behaviour
        if remove_weight and config is not None and config.lora_config is not None:
            remove_weight = False  # FLoRA layers read the unpacked weight
        return orig(layer, remove_weight)

    return dispatch_cpu_unquantized_gemm


# --- engine core and worker: adapter ids the batch holds --------------------------------------


def _by_id(loras: Any) -> list[Any]:
    """One LoRARequest per adapter id, in first-seen order."""
    return list({lora.lora_int_id: lora for lora in loras}.values())


def _active_loras_by_id(orig: Callable) -> Callable:
    """V1 model runner (`InputBatch.make_lora_inputs`, vLLM <= 0.33): the step's adapters, one
    per *id*. Stock vLLM collects them in a set of LoRARequest, which compares by name up to
    0.33: an adapter reloaded under its name (a new id) while requests on its old id still run
    collapses to one entry, the other id is never activated, and the worker dies in
    `convert_mapping` (KeyError: the id) taking every tenant down."""

    @functools.wraps(orig)
    def make_lora_inputs(self: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        prompt_mapping, token_mapping, _ = orig(self, *args, **kwargs)
        return prompt_mapping, token_mapping, _by_id(self.lora_id_to_lora_request.values())

    return make_lora_inputs


def _lora_state_loras_by_id(orig: Callable) -> Callable:
    """V2 model runner (`LoraState.get_activate_loras`, CUDA's default runner, vLLM <= 0.33):
    the same collapse as `_active_loras_by_id` (a set of LoRARequest by name); its
    `make_lora_inputs` and its count of active adapters both read this method."""

    @functools.wraps(orig)
    def get_activate_loras(self: Any, req_ids: list[str]) -> list[Any]:
        requests = self.lora_requests
        return _by_id(r for r in map(requests.get, req_ids) if r is not None)

    return get_activate_loras


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


def _replace_convert_mapping(_stock: Callable) -> Callable:
    return convert_mapping


def host_slot_counts(
    index_mapping: Any, lora_index_to_id: list[int | None], max_loras: int
) -> list[int]:
    """Tokens per slot, [no adapter, slot 0, ...], from the step's host-side adapter ids."""
    ids = np.asarray(index_mapping, dtype=np.int64)
    uniq, n = np.unique(ids, return_counts=True)
    slot_of = {lora_id: i for i, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    counts = [0] * (max_loras + 1)
    for lora_id, count in zip(uniq.tolist(), n.tolist(), strict=True):
        counts[slot_of[lora_id] + 1 if lora_id > 0 else 0] += count
    return counts


def _wrap_update_metadata(orig: Callable) -> Callable:
    """`PunicaWrapperBase.update_metadata` and `PunicaWrapperGPU.update_metadata` (which
    overrides the base without calling it): also keep the step's tokens per slot on the host."""

    @functools.wraps(orig)
    def update_metadata(self: Any, mapping: Any, lora_index_to_id: Any, max_loras: int, *a, **k):
        """`flora_step` = (T, [no adapter, slot 0, ...]), counted from the mapping's host ids,
        so the layers decide once per step which paths run, with no device sync at all."""
        orig(self, mapping, lora_index_to_id, max_loras, *a, **k)
        index_mapping = mapping.index_mapping
        self.flora_step = (
            len(index_mapping), host_slot_counts(index_mapping, lora_index_to_id, max_loras)
        )

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


# --- vLLM state the FLoRA layers read (`flora_vllm.layers`) -------------------------------------


def step_host_counts(punica: Any) -> tuple[int, list[int]] | None:
    """(T, tokens per slot [no adapter, slot 0, ...]) of this step, kept on the host by the
    `update_metadata` hook; None before the first step."""
    return getattr(punica, "flora_step", None)


def step_slots(punica: Any) -> torch.Tensor:
    """[T] adapter slot of each token of this step, -1 for none (vLLM's punica wrapper)."""
    return punica.token_lora_indices


def slots_buffer(punica: Any) -> torch.Tensor:
    """The punica wrapper's whole slot buffer, [max_batched_tokens] at a fixed address (what a
    CUDA graph may read); a private attribute of vLLM 0.29's `PunicaWrapperBase`."""
    buffer = getattr(punica, "_token_lora_indices", None)
    if buffer is None:
        raise RuntimeError(
            "vLLM's PunicaWrapperBase has no `_token_lora_indices` (checked with vLLM 0.29.0); "
            "the fused FLoRA path cannot read the step's slots"
        )
    return buffer


def cpu_linear(layer: Any) -> Callable | None:
    """vLLM's CPU GEMM of a linear layer, `(x, weight, bias) -> y` (set by
    `dispatch_cpu_unquantized_gemm`; oneDNN / sgl packed weights), or None off the CPU."""
    return getattr(layer, "cpu_linear", None)


def make_gemm(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x W^T with vLLM's own GEMM for W on the CPU (oneDNN / sgl packed weights, several
    times faster than F.linear there), plain F.linear elsewhere. Packs a copy of W on the CPU."""
    if weight.device.type != "cpu":
        return lambda x: torch.nn.functional.linear(x, weight)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    shim = SimpleNamespace(weight=weight)
    dispatch_cpu_unquantized_gemm(shim, remove_weight=False)
    fn = shim.cpu_linear
    return lambda x: fn(x, weight, None)


def lora_on_output(layer: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """vLLM's LoRA (punica) added onto a layer's output for the step's LoRA tokens (a private
    method of `BaseLinearLayerWithLoRA`, which every `<Base>WithFLoRA` inherits)."""
    return layer._apply_lora_to_output(x, output)
