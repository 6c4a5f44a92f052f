"""Ray Serve: N replicas of the FLoRA-enabled vLLM engine behind one OpenAI-compatible endpoint.

Why: one URL for many engine replicas, with each adapter served by a replica that already holds
it. Everything runs on Ray Serve LLM's own stack (`LLMConfig`, `LLMServer`, `OpenAiIngress`,
`build_llm_deployment`); the plugin reaches every replica through its `vllm.general_plugins` entry
point, so this file only builds engine args and routes:

- `FloraServeConfig.llm_config()`: vLLM engine args, CPU or GPU placement, LoRA multiplexing.
- `LocalLoraModelLoader`: adapters from local folders (Ray 2.60 fetches only cloud URLs, which
  still work through Ray's own loader with `dynamic_lora_path`).
- `FloraLLMServer`: when Serve's multiplex LRU evicts an adapter, vLLM forgets and frees it too
  (Ray 2.60's `LLMServer` only ever adds adapters to the engine); per-replica residency and
  affinity counters.
- `FloraIngress`: `model="<adapter>"` means `"<base>:<adapter>"`; `/v1/models` lists the
  adapters; `GET /flora/stats` gathers every replica's counters.
- `AdapterAffinityRouter`: a request goes to a replica that holds its adapter unless that replica
  is overloaded (its queue exceeds the shortest by more than `imbalanced_threshold`), otherwise to
  the least-loaded replica (fewest adapters on ties), which loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import functools
import json
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import PrivateAttr
from ray import serve
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ModelCard,
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.llm._internal.serve.core.ingress.ingress import init as init_ingress_app
from ray.llm._internal.serve.utils.broadcast import broadcast
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)
from starlette.responses import Response

from flora_vllm.config import get_config
from flora_vllm.lifecycle import ADAPTERS
from flora_vllm.serving import metrics
from flora_vllm.serving.access import AdapterPathRefusedError, ApiKeyMiddleware, find_adapter_folder
from flora_vllm.serving.server import DEFAULT_ENV
from flora_vllm.vllm_hooks import (
    AFTER_RELEASE,
    pin_adapter,
    refresh_live_gauges,
    settle_releases,
)

APP_NAME = "flora"
_RESOLVED: contextvars.ContextVar[Any] = contextvars.ContextVar("flora_resolved", default=None)
"""The LoRARequest Serve's multiplex lookup resolved for the current request (its task)."""


@dataclass
class FloraServeConfig:
    """One base model with its adapters, served by `replicas` engines."""

    model: str
    """Base model: a local folder (on every node) or a Hugging Face id."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter name -> local folder (FLoRA or PEFT LoRA), readable on every node."""
    served_model_name: str | None = None
    """The base model's id for clients (default: the folder's name); adapters are `<adapter>`
    or `<id>:<adapter>`. Must not contain ':'."""
    replicas: int = 1
    device: str = "auto"
    """`cpu`, `gpu`, or `auto` (GPU when the cluster, or without one this machine, has one)."""
    max_loras: int = 4
    """vLLM adapter slots per batch (`--max-loras`)."""
    max_lora_rank: int = 8
    adapters_per_replica: int | None = None
    """Adapters one replica keeps loaded (Serve's multiplex LRU and vLLM's `max_cpu_loras`, kept
    equal); default max(max_loras, number of adapters)."""
    max_model_len: int | None = None
    cpus_per_replica: float = 1.0
    """CPU only: Ray CPUs reserved for each engine (the replica actor itself takes none)."""
    kv_cache_gib: int = int(DEFAULT_ENV["VLLM_CPU_KVCACHE_SPACE"])
    """CPU only: `VLLM_CPU_KVCACHE_SPACE` for each engine."""
    dynamic_lora_path: str | None = None
    """Cloud folder (s3://, gs://, abfss://, azure://) of more adapters, loaded by Ray on demand
    as `<id>:<subfolder>`."""
    imbalanced_threshold: int = 16
    """Queue-length excess over the least-loaded replica at which adapter affinity gives way."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """More vLLM engine args (they override ours)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the engines (e.g. FLORA_EXECUTION)."""
    api_key: str | None = None
    """With a key, every path of the app needs `Authorization: Bearer <key>` (as `--api-key`
    on the vLLM server); Serve's own `/-/healthz` stays open."""
    adapter_roots: list[str] = field(default_factory=list)
    """Folders adapters may be read from (as `flora-vllm serve --adapter-root`): every adapter
    path is checked at start-up and the engines refuse any other (FLORA_ADAPTER_ROOTS)."""

    def __post_init__(self) -> None:
        self.served_model_name = self.served_model_name or os.path.basename(self.model.rstrip("/"))
        problems = []
        if ":" in self.served_model_name:
            problems.append(f"served model name {self.served_model_name!r} contains ':'")
        if self.replicas < 1:
            problems.append(f"replicas={self.replicas}; use >= 1")
        if self.device not in ("auto", "cpu", "gpu"):
            problems.append(f"device={self.device!r}; use cpu, gpu or auto")
        bad = [n for n in self.adapters if ":" in n or n == self.served_model_name]
        if bad:
            problems.append(f"adapter names {bad} contain ':' or equal the base model's name")
        if self.adapter_roots:
            from flora_vllm.serving.access import AdapterPathRefusedError, check_adapter_path

            self.adapter_roots = [os.path.realpath(r) for r in self.adapter_roots]
            problems += [f"adapter root {r!r} is not a directory"
                         for r in self.adapter_roots if not os.path.isdir(r)]
            for name, path in self.adapters.items():
                try:
                    check_adapter_path(path, self.adapter_roots)
                except (AdapterPathRefusedError, ValueError) as e:
                    problems.append(f"adapter {name!r}: {e}")
            if self.dynamic_lora_path:
                problems.append(
                    "dynamic_lora_path (a cloud folder) cannot be combined with adapter_roots"
                )
        if self.adapters_per_replica is not None and self.adapters_per_replica < self.max_loras:
            problems.append(
                f"adapters_per_replica={self.adapters_per_replica} < max_loras={self.max_loras}"
            )
        if problems:
            raise ValueError("invalid Ray Serve settings: " + "; ".join(problems))

    @property
    def capacity(self) -> int:
        """Adapters per replica, in Serve's multiplex LRU and in vLLM (`max_cpu_loras`)."""
        given = self.adapters_per_replica or self.engine_kwargs.get("max_cpu_loras")
        return given or max(self.max_loras, len(self.adapters))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import ray

        if ray.is_initialized():
            return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"

    def llm_config(self) -> LLMConfig:
        """Ray Serve LLM's config: only real vLLM engine args go into `engine_kwargs`."""
        cpu = self.resolved_device() == "cpu"
        engine_kwargs: dict[str, Any] = {
            "enable_lora": True,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "max_cpu_loras": self.capacity,
        }
        if cpu:  # as `flora-vllm serve` on a CPU: it reserves this share of RAM
            engine_kwargs |= {"dtype": "float32", "gpu_memory_utilization": 0.3}
        if self.max_model_len:
            engine_kwargs["max_model_len"] = self.max_model_len
        env = {k: v for k, v in os.environ.items() if k.startswith("FLORA_")}
        if self.adapter_roots:
            env["FLORA_ADAPTER_ROOTS"] = os.pathsep.join(self.adapter_roots)
        # Serve's multiplex cache is a replica's one resolver (LocalLoraModelLoader reads the
        # roots): vLLM's own, which the plugin turns on with roots, stays off in replicas.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "0"
        if cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        router = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": self.imbalanced_threshold},
        )
        return LLMConfig(
            model_loading_config={"model_id": self.served_model_name, "model_source": self.model},
            accelerator_config={"kind": "cpu"} if cpu else None,
            placement_group_config={"bundles": [{"CPU": self.cpus_per_replica}]} if cpu else None,
            engine_kwargs=engine_kwargs | self.engine_kwargs,
            lora_config={
                "max_num_adapters_per_replica": self.capacity,
                "dynamic_lora_loading_path": self.dynamic_lora_path,
            },
            runtime_env={"env_vars": env | self.env},
            deployment_config={
                "num_replicas": self.replicas,
                "ray_actor_options": {"num_cpus": 0} if cpu else {},
                "request_router_config": router,
            },
        )


# --- replicas: local adapters, and vLLM's adapters kept equal to Serve's ------------------------


class ResidentAdapter(DiskMultiplexConfig):
    """An adapter in Serve's multiplex cache; Serve calls `__del__` (in a thread) on eviction."""

    _on_evict: Callable[[str], None] | None = PrivateAttr(default=None)

    def __del__(self) -> None:  # Serve's documented unload hook; idempotent (GC calls it too)
        on_evict, self._on_evict = getattr(self, "_on_evict", None), None
        if on_evict is not None:
            on_evict(self.model_id)


class LocalLoraModelLoader(LoraModelLoader):
    """Serve's adapter loader: local folders by name, other names from Ray's cloud loader; the
    engine takes the adapter (`admit`) before Serve caches it, so one vLLM refuses never enters
    Serve's cache."""

    def __init__(
        self,
        *,
        adapters: Mapping[str, str],
        admit: Callable[[DiskMultiplexConfig], Awaitable[None]],
        on_evict: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._adapters = dict(adapters)
        self._admit, self._on_evict = admit, on_evict

    async def load_model_from_config(
        self, lora_model_id: str, llm_config: LLMConfig
    ) -> DiskMultiplexConfig:
        name = get_lora_id(lora_model_id)
        dynamic = llm_config.lora_config.dynamic_lora_loading_path  # never with roots (config)
        path = self._adapters.get(name)
        if path is None and not dynamic:
            path = _in_roots(name, get_config().adapter_roots)
        if path is not None:
            disk = DiskMultiplexConfig(
                model_id=lora_model_id,
                max_total_tokens=llm_config.max_request_context_length,
                local_path=path,
                lora_assigned_int_id=global_id_manager.next(),
            )
        elif dynamic:
            disk = await super().load_model_from_config(lora_model_id, llm_config)
        else:
            raise _unknown_adapter(name, self._adapters, get_config().adapter_roots)
        adapter = ResidentAdapter(**disk.model_dump())
        await self._admit(adapter)
        adapter._on_evict = self._on_evict
        return adapter


def _unknown_adapter(name: str, known: Iterable[str], roots: Sequence[str]) -> Exception:
    where = f" nor in the adapter roots {list(roots)}" if roots else ""
    message = f"unknown adapter {name!r}: not among {sorted(known)}{where}"
    return OpenAIHTTPException(404, message, "NotFoundError")


def _in_roots(name: str, roots: Sequence[str]) -> str | None:
    """The adapter roots' folder for `name` (as the vLLM server's resolver finds it), None
    where no root has it; a name leading outside the roots is a 403, a null byte a 400."""
    try:
        return find_adapter_folder(name, roots)
    except AdapterPathRefusedError as e:
        raise OpenAIHTTPException(403, str(e), "PermissionDenied") from e
    except ValueError as e:
        raise OpenAIHTTPException(400, str(e), "BadRequestError") from e


def _engine_internals(engine: Any) -> tuple[Any, Any]:
    """Ray 2.60 `VLLMEngine`'s OpenAI model registry and vLLM engine client (private names)."""
    models, client = getattr(engine, "_oai_models", None), getattr(engine, "_engine_client", None)
    if models is None or client is None or not hasattr(client, "remove_lora"):
        raise RuntimeError(
            "Ray Serve's VLLMEngine lacks `_oai_models`/`_engine_client` (checked with ray "
            "2.60.0); flora_vllm.ray_serve cannot keep vLLM's adapters equal to Serve's"
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
    adapter id it resolved (`vllm_hooks.pin_adapter`), so vLLM's handler serves that id even if
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
        try:
            await self.engine.resolve_lora(disk)
        except ValueError as e:  # vLLM's (and the plugin's) own message, with every problem
            raise OpenAIHTTPException(400, str(e), "BadRequestError") from e
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


# --- ingress: adapter names, /v1/models, /flora/stats --------------------------------------------


class FloraIngress(OpenAiIngress):
    """Ray's OpenAI ingress; a bare adapter name is routed as `<base>:<adapter>`."""

    ENDPOINTS = {
        "flora_stats": lambda app: app.get("/flora/stats"),
        "flora_metrics": lambda app: app.get("/metrics"),
    }

    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, ModelCard],
        *,
        adapters: Mapping[str, Mapping[str, str]] | None = None,
        adapter_roots: Mapping[str, Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._adapters = {base: dict(names) for base, names in (adapters or {}).items()}
        # bases whose replicas serve adapters from roots (a filesystem every node sees)
        self._roots = {base: list(r) for base, r in (adapter_roots or {}).items() if r}

    def _full_id(self, model: str | None) -> str | None:
        """`<adapter>` -> `<base>:<adapter>` (Serve's multiplexed id, and vLLM's adapter name)."""
        if model is None or model in self._model_cards or ":" in model:
            return model
        bases = [b for b, names in self._adapters.items() if model in names]
        bases = bases or list(self._lora_paths) or list(self._roots)  # a cloud / roots adapter
        return f"{bases[0]}:{model}" if len(bases) == 1 else model

    async def _get_model_id(self, model: str | None) -> str:
        full = self._full_id(model)
        if full is not None and get_base_model_id(full) not in self._model_cards:
            served = [*self._model_cards, *(n for a in self._adapters.values() for n in a)]
            message = f"model {model!r} is not served here; models: {served}"
            raise OpenAIHTTPException(404, message, "NotFoundError")
        if full is not None:
            self._check_adapter(full)
        return await super()._get_model_id(full)

    def _check_adapter(self, full: str) -> None:
        """Refuse here an adapter no replica could load (unknown, outside or missing from the
        roots), before Serve routes it: a name Serve's multiplexing has seen stays in its
        state, and clients choose the names."""
        base, _, name = full.partition(":")
        if not name or name in self._adapters.get(base, {}) or base in self._lora_paths:
            return
        roots = self._roots.get(base, [])
        if _in_roots(name, roots) is None:
            raise _unknown_adapter(name, self._adapters.get(base, {}), roots)

    async def _get_response(self, *, body: Any, call_method: str, raw_request: Any = None):
        body.model = self._full_id(body.model)  # vLLM knows the adapter by the full id
        async for response in super()._get_response(
            body=body, call_method=call_method, raw_request=raw_request
        ):
            yield response

    def _adapter_card(self, card_id: str, base: str, name: str) -> ModelCard:
        """A card for an adapter of `base`; `root` only for adapters named at start-up (one
        found in the roots lives wherever the replica that loaded it found it)."""
        card = self._model_cards[base]
        meta = {**card.metadata, "parent": base, "model_id": f"{base}:{name}"}
        if name in self._adapters.get(base, {}):
            meta["root"] = self._adapters[base][name]
        return card.model_copy(update={"id": card_id, "metadata": meta})

    async def model(self, model_id: str) -> ModelCard | None:
        base, _, name = (self._full_id(model_id) or "").partition(":")
        if name in self._adapters.get(base, {}):
            return self._adapter_card(model_id, base, name)
        return await super().model(model_id)

    async def models(self) -> Any:
        """The base models, their adapters, and adapters some replica loaded from the roots."""
        listing = await super().models()
        for base, names in self._adapters.items():
            listing.data += [self._adapter_card(name, base, name) for name in names]
        if self._roots:
            resident = {m for r in await self._every_replica("flora_stats")
                        for m in r["serve_resident"]}
            for full in sorted(resident):
                base, _, name = full.partition(":")
                if name not in self._adapters.get(base, {}):
                    listing.data.append(self._adapter_card(name, base, name))
        return listing

    async def _every_replica(self, method: str) -> list[dict[str, Any]]:
        """`method`'s answer from every replica of every base model."""
        replicas: list[dict[str, Any]] = []
        for base in self._default_serve_handles:
            handle = self._get_configured_serve_handle(base)
            for attempt in range(5):  # a replica that just died may still be listed
                try:
                    replicas += await asyncio.to_thread(broadcast, handle, method)
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(1.0)
        return replicas

    async def flora_metrics(self) -> Response:
        """Per-adapter Prometheus metrics of every replica (label `replica`), like the vLLM
        server's `/metrics` but for the whole Serve app."""
        replicas = await self._every_replica("flora_metrics")
        text = metrics.render({r["replica"]: r["metrics"] for r in replicas})
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def flora_stats(self) -> dict[str, Any]:
        """Every replica's adapter residency and counters; affinity hit rate = share of adapter
        requests that found their adapter already loaded on the replica they were routed to."""
        replicas = await self._every_replica("flora_stats")
        totals = {k: sum(r[k] for r in replicas) for k in _COUNTERS}
        rate = totals["affinity_hits"] / max(1, totals["adapter_requests"])
        return {"replicas": replicas, "totals": totals, "affinity_hit_rate": rate}


# --- routing -------------------------------------------------------------------------------------


RECENT_MAX = 4096  # adapter names the router remembers between replica reports


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Adapter requests go to a replica holding the adapter unless it is overloaded; the rest,
    and base requests, to the least-loaded replica (fewest adapters on ties)."""

    def initialize_state(self, imbalanced_threshold: int = 16, sticky_s: float = 60.0) -> None:
        self._imbalanced_threshold = imbalanced_threshold
        # Replicas report their adapters through the controller, late on a busy machine; until
        # the replica we sent an adapter to reports it, its next requests follow it there.
        # sticky_s only bounds that for an adapter never reported (its load failed).
        self._sticky_s = sticky_s
        # Oldest first; entries are dropped once reported, when older than sticky_s, and never
        # more than RECENT_MAX are kept (clients choose the names: `base:<anything>`).
        self._recent: collections.OrderedDict[str, tuple[ReplicaID, float]] = (
            collections.OrderedDict()
        )

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, float]:
        lens: dict[ReplicaID, float] = {}
        unknown = []
        for r in replicas:
            n = self._replica_queue_len_cache.get(r.replica_id)
            if n is None or n >= r.max_ongoing_requests:
                unknown.append(r)
            else:
                lens[r.replica_id] = n
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                full = n is None or n >= r.max_ongoing_requests
                lens[r.replica_id] = float("inf") if full else n
        return lens

    def _held(self) -> dict[ReplicaID, set[str]]:
        """Adapters per replica as reported, plus, for adapters no replica reports yet, where
        we last sent one (until its replica reports it)."""
        held = {rid: set(r.multiplexed_model_ids) for rid, r in self._replicas.items()}
        reported = set().union(*held.values())
        now, caught_up = time.monotonic(), []
        for model_id, (rid, at) in self._recent.items():
            if model_id in held.get(rid, ()):
                caught_up.append(model_id)  # its replica's report has it: trust reports now
            elif model_id not in reported and now - at < self._sticky_s and rid in held:
                held[rid].add(model_id)
        for model_id in caught_up:
            del self._recent[model_id]
        return held

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        lens = await self._queue_lens(candidate_replicas)
        held = self._held()

        def load(r: RunningReplica) -> float:
            return lens.get(r.replica_id, float("inf"))

        def rank(r: RunningReplica) -> tuple[float, int]:  # least loaded, then fewest adapters
            return load(r), len(held.get(r.replica_id, ()))

        by_load = sorted(candidate_replicas, key=rank)
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model_id:
            return [by_load]
        least = load(by_load[0])
        warm = [
            r
            for r in by_load
            if model_id in held.get(r.replica_id, ())
            and load(r) - least <= self._imbalanced_threshold
        ]
        return [warm, by_load] if warm else [by_load]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        model_id = pending_request.metadata.multiplexed_model_id
        if model_id:
            now = time.monotonic()
            self._recent[model_id] = (replica_id, now)
            self._recent.move_to_end(model_id)
            while self._recent:
                _, (_, at) = next(iter(self._recent.items()))
                if now - at < self._sticky_s and len(self._recent) <= RECENT_MAX:
                    break
                self._recent.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for m in [m for m, v in self._recent.items() if v[0] == replica_id]:
            del self._recent[m]


# --- the application -----------------------------------------------------------------------------


def build_app(cfg: FloraServeConfig) -> Application:
    """Ray Serve's OpenAI app (as `build_openai_app` composes it) with our server and ingress."""
    llm_config = cfg.llm_config()
    base = llm_config.model_id
    server = build_llm_deployment(
        llm_config, bind_kwargs={"adapters": cfg.adapters}, deployment_cls=FloraLLMServer
    )
    options = FloraIngress.get_deployment_options([llm_config])
    options["ray_actor_options"] = {"num_cpus": 0}  # it only forwards requests
    app = init_ingress_app()  # Ray's app (exception handling, CORS, HTTP metrics)
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, tokens=[cfg.api_key])  # outermost
    ingress = make_fastapi_ingress(
        FloraIngress, endpoint_map={**DEFAULT_ENDPOINTS, **FloraIngress.ENDPOINTS}, app=app
    )
    lora_paths = {base: cfg.dynamic_lora_path} if cfg.dynamic_lora_path else {}
    return serve.deployment(ingress, **options).bind(
        llm_deployments={base: server},
        model_cards={base: to_model_metadata(base, llm_config)},
        lora_paths=lora_paths,
        adapters={base: cfg.adapters},
        adapter_roots={base: cfg.adapter_roots},
    )


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run flora_vllm.ray_serve:app_builder model=... ` / a RayService `import_path`:
    `args` are `FloraServeConfig`'s fields."""
    return build_app(FloraServeConfig(**args))


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    bad = [i for i in items if "=" not in i]
    if bad:
        raise SystemExit(f"{what}: expected NAME=VALUE, got {bad}")
    return dict(i.split("=", 1) for i in items)


def parse_args(argv: Sequence[str]) -> tuple[FloraServeConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="flora-vllm ray-serve",
        description="Serve FLoRA/LoRA adapters from N vLLM replicas behind one OpenAI endpoint "
        "(Ray Serve LLM), each adapter routed to a replica that holds it.",
    )
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="base model (or --model)")
    p.add_argument("--model", help="base model folder or Hugging Face id")
    p.add_argument("--served-model-name", help="the base model's id (default: folder name)")
    p.add_argument("--adapters", "--lora-modules", nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--replicas", type=int, default=1)
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", dest="device", action="store_const", const="cpu")
    dev.add_argument("--gpu", dest="device", action="store_const", const="gpu")
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=8)
    p.add_argument("--adapters-per-replica", type=int, help="default max(max-loras, #adapters)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--kv-cache-gib", type=int, default=FloraServeConfig.kv_cache_gib)
    p.add_argument("--dynamic-lora-path", help="cloud folder of more adapters (s3://, gs://)")
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="adapters only from inside DIR (repeatable), as on `flora-vllm serve`",
    )
    p.add_argument("--imbalanced-threshold", type=int, default=16)
    p.add_argument("--engine-kwargs", type=json.loads, default={}, help="JSON: more vLLM args")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="engine env vars")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="require `Authorization: Bearer KEY` on every path (default $VLLM_API_KEY)",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (auto, ray://head:10001); default $RAY_ADDRESS, else a new "
        "local cluster",
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app-name", default=APP_NAME)
    a = p.parse_args(argv)
    model = a.model or a.model_pos
    if not model:
        p.error("give the base model: flora-vllm ray-serve MODEL or --model MODEL")
    cfg = FloraServeConfig(
        model=model,
        adapters=_pairs(a.adapters, "--adapters"),
        served_model_name=a.served_model_name,
        replicas=a.replicas,
        device=a.device or "auto",
        max_loras=a.max_loras,
        max_lora_rank=a.max_lora_rank,
        adapters_per_replica=a.adapters_per_replica,
        max_model_len=a.max_model_len,
        cpus_per_replica=a.cpus_per_replica,
        kv_cache_gib=a.kv_cache_gib,
        dynamic_lora_path=a.dynamic_lora_path,
        imbalanced_threshold=a.imbalanced_threshold,
        engine_kwargs=a.engine_kwargs,
        env=_pairs(a.env, "--env"),
        api_key=a.api_key,
        adapter_roots=a.adapter_root,
    )
    return cfg, a


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, else start a local one; True if we started it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters would write a token
    ray.init(address="local", include_dashboard=False)
    return True


def deploy(cfg: FloraServeConfig, host: str, port: int, app_name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxy and the app; return the endpoint URL once every replica is up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=app_name, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/v1"


def main(argv: Sequence[str] | None = None) -> int:
    """`flora-vllm ray-serve`: deploy, print the endpoint, block until Ctrl-C, shut down."""
    cfg, a = parse_args(list(sys.argv[1:] if argv is None else argv))
    import ray

    started = connect(a.address)
    t0 = time.monotonic()
    try:
        url = deploy(cfg, a.host, a.port, a.app_name)
        print(
            f"FLoRA on Ray Serve: {url}  ({cfg.replicas} x {cfg.served_model_name}, adapters "
            f"{sorted(cfg.adapters)}, up in {time.monotonic() - t0:.0f}s; stats: "
            f"{url.removesuffix('/v1')}/flora/stats; Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # a few seconds; a second Ctrl-C here would leave replicas running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("shutting down", flush=True)
        if started:
            serve.shutdown()
        else:
            serve.delete(a.app_name)
        ray.shutdown()
    return 0


if __name__ == "__main__":  # Ray pickles our classes by name: run them from the real module
    from flora_vllm.ray_serve import main as _main

    sys.exit(_main())
