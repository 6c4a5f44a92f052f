"""The app's HTTP ingress: Ray's OpenAI ingress with bare adapter names and FLoRA endpoints.

Runs in the ingress actor (`SERVE_REPLICA::<app>#FloraIngress`), behind Serve's HTTP proxy; it
forwards requests to the engine replicas through Serve handles (routed by `router.py`).

Why: clients name an adapter `model="<adapter>"`, which Ray only knows as `"<base>:<adapter>"`;
`/v1/models` lists the adapters; an adapter no replica could load is refused here, before Serve
routes it; `GET /flora/stats` and `/metrics` gather every replica's counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from ray.serve.llm.ingress import OpenAiIngress
from starlette.responses import Response

from flora_vllm.ray_serve._private import (
    ModelCard,
    OpenAIHTTPException,
    broadcast,
    get_base_model_id,
)
from flora_vllm.ray_serve.loader import _in_roots, _unknown_adapter
from flora_vllm.ray_serve.replica import _COUNTERS
from flora_vllm.serving import metrics


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
