"""Serve's adapter loader in each engine replica: adapters from local folders by name.

Runs in each engine replica actor (Serve's multiplex cache calls it on a miss); `_in_roots` and
`_unknown_adapter` also run in the ingress actor, which refuses an unknown adapter before Serve
routes it.

Why: Ray 2.60's `LoraModelLoader` fetches only cloud URLs (those still go through it, with
`dynamic_lora_path`); local folders, named at start-up or found in the adapter roots, need our
own. The engine takes an adapter before Serve caches it, so one vLLM refuses never enters
Serve's cache, and Serve's eviction hook (`ResidentAdapter.__del__`) tells the replica.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import PrivateAttr
from ray.serve.llm import LLMConfig

from flora_vllm.config import get_config
from flora_vllm.ray_serve._private import (
    DiskMultiplexConfig,
    LoraModelLoader,
    OpenAIHTTPException,
    get_lora_id,
    global_id_manager,
)
from flora_vllm.serving.access import AdapterPathRefusedError, find_adapter_folder


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
