"""Adapter-affinity routing of requests to the engine replicas.

Runs where a Serve handle to the engine deployment sends requests: here the ingress actor (its
handles to `FloraLLMServer`); Serve makes one router per handle, from this class as
`RequestRouterConfig` names it (`flora_vllm.ray_serve.router.AdapterAffinityRouter`, pickled by
value from this module, so it must live here and never under `__main__`).

Why: Serve's default routers know nothing of adapters. A request goes to a replica that holds
its adapter unless that replica is overloaded (its queue exceeds the shortest by more than
`imbalanced_threshold`), otherwise to the least-loaded replica (fewest adapters on ties), which
loads it; an adapter just sent somewhere follows until that replica reports it.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

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
