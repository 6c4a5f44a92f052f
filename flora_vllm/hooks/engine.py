"""Engine-core process: adapters leave the engine only when no scheduled request uses them.

Runs in vLLM's engine core (the scheduler's process), plus the platform check that every
process runs at start-up. Hooks (targets checked in `flora_vllm.hooks`):

- `EngineCore.remove_lora` / `.add_lora` / `.add_request` / `.abort_requests` / `.step` /
  `.step_with_batch_queue`: defense in depth: a removal waits while the scheduler holds a
  request of that id; a request arriving with a removed id fails alone, its reason in the
  output's `stop_reason` (reads `EngineCoreProc.output_queue`, `_send_error_outputs_to_client`).
- `vllm.v1.core.kv_cache_utils._gen_lora_extra_hash_keys`: prefix-cache blocks are keyed by
  adapter name *and id*, so a reloaded adapter never reuses KV computed with its old weights
  (two variants: a string key up to vLLM 0.30, the tagged tuple from 0.31).
- `CpuPlatform.check_and_update_config`: keeps vLLM's compilation with LoRA on (adapter layers
  are opaque nodes), and refuses adapters with pipeline parallelism at start-up.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from typing import Any

from flora_vllm.config import get_config

logger = logging.getLogger("flora_vllm")


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


GONE_MARK = "flora_vllm adapter gone: "
"""Starts the `stop_reason` of a request the engine core refused for its adapter id; the API
server turns such an output into a 503 carrying the reason (`api_server._wrap_generate`)."""


def _send_refusal(core: Any, request: Any, reason: str) -> None:
    """Finish `request` with an error whose `stop_reason` carries the reason to the API server
    (vLLM's own error output carries none: its client would see a bare 500)."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    queue = getattr(core, "output_queue", None)
    if queue is None:  # not a process engine core with an output queue: vLLM's error output
        core._send_error_outputs_to_client([request.request_id], request.client_index)
        return
    output = EngineCoreOutput(
        request.request_id, [], finish_reason=FinishReason.ERROR, stop_reason=GONE_MARK + reason
    )
    outputs = EngineCoreOutputs(finished_requests={request.request_id}, outputs=[output])
    queue.put_nowait((request.client_index, outputs))


def _wrap_core_add_request(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Defense in depth: a request whose adapter id was removed fails alone, with its
        reason sent to its client (a 503), instead of
        reaching a worker that no longer holds its weights (the worker would load the id again
        from its path, or the step would crash)."""
        lora = request.lora_request
        if lora is not None and lora.lora_int_id in _engine_state(self)[1]:
            reason = (
                f"adapter '{lora.lora_name}' (id {lora.lora_int_id}) was unloaded from the "
                f"engine before request {request.request_id} reached it"
            )
            logger.error("flora_vllm: %s; failing this request only", reason)
            if not hasattr(self, "_send_error_outputs_to_client"):  # in-process (LLM class)
                raise AdapterGoneError(reason)
            _send_refusal(self, request, reason)
            return None
        return orig(self, request, *args, **kwargs)

    return add_request


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


def _lora_extra_hash_keys_named(request: Any) -> list[str]:
    """vLLM <= 0.30: block-hash key of a request's adapter, name and id. Stock vLLM keys by
    name only, so an adapter reloaded under its name with new weights would reuse KV blocks of
    the old weights."""
    lora = request.lora_request
    return [] if lora is None else [f"{lora.lora_name}#{lora.lora_int_id}"]


def _lora_extra_hash_keys_tagged(request: Any) -> list[tuple[str, str, str, int]]:
    """vLLM >= 0.31: the tagged key `("lora", name, path)` with the id appended. Stock keys by
    path, so a reload from the same (rewritten) folder would reuse stale KV blocks; KV events
    still read the tag and the name (`to_event_extra_keys`: `key[0]`, `key[1]`)."""
    lora = request.lora_request
    if lora is None:
        return []
    return [("lora", lora.lora_name, lora.lora_path, lora.lora_int_id)]


def _replace_hash_keys_named(_stock: Callable) -> Callable:
    return _lora_extra_hash_keys_named


def _replace_hash_keys_tagged(_stock: Callable) -> Callable:
    return _lora_extra_hash_keys_tagged
