"""The engine replica: Ray's `LLMServer` whose vLLM engine holds exactly Serve's adapters.

Runs in each engine replica actor (`SERVE_REPLICA::<app>#FloraLLMServer:<base>`), next to its
vLLM engine client; vLLM loads the plugin there from its entry point.

Why: Ray 2.60 loads an adapter into vLLM on a multiplex cache miss but does nothing when the LRU
evicts one. Here an eviction unregisters it and frees its weights once its last request is
done (`flora_vllm.lifecycle`); each request is pinned to the adapter id Serve's lookup resolved;
and the replica counts residency and affinity for `/flora/stats` and `/metrics`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from ray import serve
from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import LLMServer

from flora_vllm.hooks.api_metrics import refresh_live_gauges
from flora_vllm.hooks.api_server import pin_adapter
from flora_vllm.lifecycle import ADAPTERS, AFTER_RELEASE, settle_releases
from flora_vllm.ray_serve._private import (
    SUPPORTED_RAY,
    DiskMultiplexConfig,
    OpenAIHTTPException,
    check_ray,
)
from flora_vllm.ray_serve.loader import LocalLoraModelLoader
from flora_vllm.serving import metrics

_RESOLVED: contextvars.ContextVar[Any] = contextvars.ContextVar("flora_resolved", default=None)
"""The LoRARequest Serve's multiplex lookup resolved for the current request (its task)."""


def _engine_internals(engine: Any) -> tuple[Any, Any]:
    """Ray 2.60 `VLLMEngine`'s OpenAI model registry and vLLM engine client (private names)."""
    models, client = getattr(engine, "_oai_models", None), getattr(engine, "_engine_client", None)
    if models is None or client is None or not hasattr(client, "remove_lora"):
        raise RuntimeError(
            "Ray Serve's VLLMEngine lacks `_oai_models`/`_engine_client` (checked with ray "
            f"{SUPPORTED_RAY}); flora_vllm.ray_serve cannot keep vLLM's adapters equal to Serve's"
        )
    return models, client


class FloraLLMServer(LLMServer):
    """Ray's `LLMServer` whose engine holds exactly the adapters Serve's multiplex cache holds.

    Ray 2.60 loads an adapter into vLLM on a multiplex cache miss but does nothing when the LRU
    evicts one: vLLM keeps it registered and its weights cached. Here an eviction unregisters it
    at once and frees its weights (`remove_lora`) when its last request is done, through the same
    reference counts as the vLLM server (`flora_vllm.lifecycle`); and a new adapter enters the
    engine before Serve's cache, so one vLLM refuses is not cached at all.

    Adapter resolution happens here, in Serve's multiplex lookup: the request is pinned to the
    adapter id it resolved (`hooks.api_server.pin_adapter`), so vLLM's handler serves that id even
    if
    an eviction unregistered the name meanwhile.
    """

    async def __init__(
        self,
        llm_config: LLMConfig,
        *,
        adapters: Mapping[str, str] | None = None,
        engine_cls: Any = None,
        model_downloader: Any = None,
    ) -> None:
        check_ray()  # a Ray upgrade fails here, at start-up, with every problem listed
        self._mutex = threading.Lock()  # Serve calls eviction hooks from a thread
        self._resident: set[str] = set()  # Serve's view: loaded through our loader, not evicted
        self._evicted: list[str] = []
        self._stats: collections.Counter[str] = collections.Counter()
        self._adapter_lock = asyncio.Lock()
        loader = model_downloader or functools.partial(
            LocalLoraModelLoader,
            adapters=adapters or {},
            admit=self._admit,
            on_evict=self._evicted_by_serve,
        )
        await super().__init__(llm_config, engine_cls=engine_cls, model_downloader=loader)
        _engine_internals(self.engine)  # fail at start-up, not on the first eviction
        AFTER_RELEASE.append(self._restore_dropped)

    def _evicted_by_serve(self, model_id: str) -> None:
        with self._mutex:
            self._resident.discard(model_id)
            self._evicted.append(model_id)
            self._stats["evictions"] += 1

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        """Serve's multiplex lookup; on a miss its LRU evicts and our loader `_admit`s. A hit is a
        request that found its adapter already on this replica."""
        model_id = serve.get_multiplexed_model_id()
        self._stats["requests"] += 1
        if not model_id:
            return
        if self._llm_config.lora_config is None:
            raise ValueError("Must setup lora config for multiplexed requests.")
        async with self._adapter_lock:
            with self._mutex:
                hit = model_id in self._resident
            disk = await self._load_model(model_id)  # on a miss: `_admit`, from the loader
            await self.engine.resolve_lora(disk)  # Ray's step; a no-op once admitted
            models, _ = _engine_internals(self.engine)
            _RESOLVED.set(models.lora_requests.get(model_id))  # read by `_run_request`
        self._stats["adapter_requests"] += 1
        self._stats["affinity_hits"] += hit

    async def _admit(self, disk: DiskMultiplexConfig) -> None:
        """Serve is loading `disk` (after evicting what its LRU chose): the engine drops the
        evicted adapters, then takes this one (a refusal is a 400 and Serve does not cache it)."""
        with self._mutex:
            evicted = [m for m in self._evicted if m not in self._resident]
            self._evicted.clear()
        for old in evicted:
            await self._unregister(old)
        await settle_releases()  # idle evicted adapters have left the engine
        # What Ray's `resolve_lora` does, keeping the answer's status (Ray makes every refusal
        # a ValueError: a slow disk's 503 or a 403 would reach the client as a 400).
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        models, _ = _engine_internals(self.engine)
        if disk.model_id not in models.lora_requests:
            load = LoadLoRAAdapterRequest(lora_name=disk.model_id, lora_path=disk.local_path)
            result = await models.load_lora_adapter(load)
            if isinstance(result, ErrorResponse):  # the message lists every problem
                error = result.error
                raise OpenAIHTTPException(error.code, error.message, error.type)
        with self._mutex:
            self._resident.add(disk.model_id)
            self._stats["adapter_loads"] += 1

    async def _unregister(self, model_id: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        models, _ = _engine_internals(self.engine)
        request = models.lora_requests.get(model_id)
        if request is None:
            return
        # The hook retires its id: the engine drops it once its last request is done.
        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=model_id))

    async def _restore_dropped(self, engine: Any) -> None:
        """After an adapter left the engine: while retired adapters were held, vLLM's own LRU may
        have dropped registered ones from its workers (they count against `max_cpu_loras`);
        once none is held any more, load those back, so Serve's and vLLM's views agree."""
        models, client = _engine_internals(self.engine)
        if engine is not client or ADAPTERS.retired():
            return
        loaded = await client.list_loras()
        for request in list(models.lora_requests.values()):
            if request.lora_int_id not in loaded:
                await client.add_lora(request)

    async def _run_request(self, request: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        """Pin the request to the adapter id Serve's lookup resolved, until its stream ends or
        is dropped (that also holds the id's reference, so the engine keeps its weights)."""
        _RESOLVED.set(None)
        stream = await super()._run_request(request, **kwargs)  # resolves: sets _RESOLVED
        lora = _RESOLVED.get()
        if lora is None:
            return stream
        done = _once(pin_adapter(request, lora))
        tracked = _tracked(stream, done)
        weakref.finalize(tracked, done)  # a stream dropped before its first item
        return tracked

    async def flora_stats(self) -> dict[str, Any]:
        """This replica's adapters as Serve, vLLM's registry and vLLM's workers see them."""
        models, client = _engine_internals(self.engine)
        names = {r.lora_int_id: n for n, r in models.lora_requests.items()} | {
            i: f"id {i} (draining)" for i in ADAPTERS.retired()
        }
        loaded = await client.list_loras()
        with self._mutex:
            resident = sorted(self._resident)
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "serve_resident": resident,
            "vllm_registered": sorted(models.lora_requests),
            "engine_loaded": sorted(names.get(i, f"id {i}") for i in loaded),
            **{k: self._stats[k] for k in _COUNTERS},
        }

    async def flora_metrics(self) -> dict[str, Any]:
        """This replica's per-adapter Prometheus samples (`serving.metrics`), gauges fresh."""
        await refresh_live_gauges(*reversed(_engine_internals(self.engine)))
        replica = serve.get_replica_context().replica_id.unique_id
        return {"replica": replica, "metrics": metrics.snapshot()}


_COUNTERS = ("requests", "adapter_requests", "affinity_hits", "adapter_loads", "evictions")


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    token = [fn]

    def call() -> None:
        try:
            first = token.pop()  # atomic: a second caller, in any thread, finds it empty
        except IndexError:
            return
        first()

    return call


async def _tracked(stream: AsyncGenerator[Any, None], done: Callable[[], None]):
    try:
        async for item in stream:
            yield item
    finally:
        done()
