"""Adapter lifetime: one reference count per adapter id, and the release of retired ids.

Why: an unloaded or replaced adapter must leave the engine only once no request can still reach
the engine with its id. A timer ("keep it 2 s") cannot promise that on a loaded machine; a count
can. Every request takes a reference on the exact adapter id it resolved, at resolution time, and
gives it back when it is done (finished, aborted, or failed before it ever reached the engine);
`retire(id, release)` runs `release` exactly once, when the count of that id is zero.

Runs in the process that resolves adapter names: vLLM's API server, or a Ray Serve replica (one
mechanism for both: the API-server hooks, `hooks.api_server`, take the leases and retire ids on
unload or reload; the replica retires the adapters Serve's LRU evicts through the same unload).
Pure Python and asyncio, no vLLM import: the engine client is only called (`remove_lora`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("flora_vllm")


class AdapterLifecycle:
    """Reference counts per adapter id; a retired id is released once its count reaches zero.

    Thread-safe: references may be given back from a garbage-collector finalizer or from Ray
    Serve's eviction thread. `release` callbacks run outside the lock, in the caller's thread,
    so they must be quick and thread-safe (the hooks hand the real work to the event loop).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: collections.Counter[int] = collections.Counter()
        self._retired: dict[int, Callable[[], None]] = {}

    def acquire(self, lora_id: int) -> None:
        """One more request uses `lora_id` (it may already be retired: it still gets served)."""
        with self._lock:
            self._refs[lora_id] += 1

    def release(self, lora_id: int) -> None:
        """A request that used `lora_id` is done; the last one out releases a retired id."""
        with self._lock:
            left = self._refs[lora_id] - 1
            if left < 0:
                raise RuntimeError(f"adapter id {lora_id} released more often than acquired")
            if left:
                self._refs[lora_id] = left
                return
            del self._refs[lora_id]
            release = self._retired.pop(lora_id, None)
        if release is not None:
            _call(release, lora_id)

    def lease(self, owner: object, lora_id: int) -> None:
        """Acquire `lora_id` for as long as `owner` lives: the reference is given back when
        `owner` is garbage-collected (every request path that can still send `owner` to the
        engine holds it, so none can once it is gone)."""
        self.acquire(lora_id)
        weakref.finalize(owner, self.release, lora_id)

    def retire(self, lora_id: int, release: Callable[[], None]) -> None:
        """`lora_id` is unloaded or replaced: run `release` now if no request uses it, else when
        the last one is done. Retiring an id twice keeps the first callback."""
        with self._lock:
            if self._refs[lora_id] > 0:
                self._retired.setdefault(lora_id, release)
                return
            del self._refs[lora_id]
        _call(release, lora_id)

    def refs(self, lora_id: int) -> int:
        """Requests using `lora_id` now."""
        with self._lock:
            return self._refs.get(lora_id, 0)

    def retired(self) -> set[int]:
        """Retired ids still waiting for their last request."""
        with self._lock:
            return set(self._retired)


def _call(release: Callable[[], None], lora_id: int) -> None:
    try:
        release()
    except Exception:  # a failed release must not fail the request that triggered it
        logger.exception("flora_vllm: releasing adapter id %d failed", lora_id)


ADAPTERS = AdapterLifecycle()
"""The process's registry: the API server's (or Ray replica's) leases and retirements."""


# --- the release: the engine drops a retired id once its last request is done ----------------


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
