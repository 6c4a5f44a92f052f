"""Adapter lifetime: one reference count per adapter id, and the release of retired ids.

Why: an unloaded or replaced adapter must leave the engine only once no request can still reach
the engine with its id. A timer ("keep it 2 s") cannot promise that on a loaded machine; a count
can. Every request takes a reference on the exact adapter id it resolved, at resolution time, and
gives it back when it is done (finished, aborted, or failed before it ever reached the engine);
`retire(id, release)` runs `release` exactly once, when the count of that id is zero.

Pure Python, no vLLM: the vLLM hooks (`flora_vllm.vllm_hooks`) take leases in the API server and
the Ray Serve replica (`flora_vllm.ray_serve`) takes its own through the same registry.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Callable

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
