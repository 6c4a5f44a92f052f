"""API-server process: per-adapter Prometheus metrics, the `/metrics` refresh and the key check.

Runs in vLLM's OpenAI API server (or a Ray Serve replica: `refresh_live_gauges`). Hooks
(targets checked in `flora_vllm.hooks`):

- `OutputProcessor._update_stats_from_finished`, `OutputProcessor.abort_requests`: per-adapter
  counters and histograms (`serving.metrics`).
- `vllm.entrypoints.launchers.app.init_entrypoints_middleware`: the per-adapter gauges' refresh
  on `/metrics` and, with `--api-key`, one key check on every path but `/health` (ours replaces
  vLLM's `AuthenticationMiddleware`, which guards `/v1` only: a request is checked once).
- `PrometheusStatLogger.__init__`: its `gauge_lora_info` (`vllm:lora_requests_info`, labelled
  with comma-joined adapter names) keeps one series with capped name lists.
- Read only: AsyncLLM's `output_processor.request_states` (requests in flight) and the
  workers' residency RPC (`worker_adapters.RESIDENCY_RPC`).
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from flora_vllm.adapter import (
    DORA_KIND,
    PEFT_TYPE,
    read_peft_type,
)
from flora_vllm.hooks.worker_adapters import RESIDENCY_RPC
from flora_vllm.serving import metrics
from flora_vllm.serving.access import ApiKeyMiddleware

logger = logging.getLogger("flora_vllm")


# --- per-adapter metrics ---------------------------------------------------------------------

_types: dict[int, str] = {}  # adapter id -> "flora" | "ia3" | "dora" | "lora" (read at load)
_KINDS = {PEFT_TYPE: "flora", "IA3": "ia3", DORA_KIND: "dora"}  # -> adapter_type; else "lora"


def remember_adapter_type(lora_id: int, peft_type: str | None) -> None:
    """The type of a just-loaded id, read when its folder was copied (no read at finish)."""
    _types[lora_id] = _KINDS.get(peft_type, "lora")


def forget_adapter_type(lora_id: int) -> None:
    """A released id's label cache entry goes with it (ids are never reused)."""
    _types.pop(lora_id, None)


def _adapter_labels(lora_request: Any) -> tuple[str, str]:
    """(adapter, adapter_type) metric labels of a request's adapter."""
    if lora_request is None:
        return "", "base"
    kind = _types.get(lora_request.lora_int_id)
    if kind is None:
        try:
            peft_type = read_peft_type(lora_request.lora_path)
        except (OSError, ValueError):
            peft_type = None
        kind = _types[lora_request.lora_int_id] = _KINDS.get(peft_type, "lora")
    return lora_request.lora_name, kind


def _observe_finished(req_state: Any, reason: str) -> None:
    try:
        stats = req_state.stats  # None with --disable-log-stats
        metrics.record_finished(
            *_adapter_labels(req_state.lora_request),
            reason,
            req_state.prompt_len or 0,
            stats.num_generation_tokens if stats else None,
            time.time() - stats.arrival_time if stats else None,
            stats.first_token_latency if stats else None,
        )
    except Exception:  # metrics must never take a request down
        logger.exception("flora_vllm: per-adapter metrics failed")


def _wrap_update_stats_from_finished(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _update_stats_from_finished(self: Any, req_state: Any, finish_reason: Any, *args: Any):
        orig(self, req_state, finish_reason, *args)
        _observe_finished(req_state, str(finish_reason))

    return _update_stats_from_finished


def _wrap_abort_requests(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def abort_requests(self: Any, request_ids: Any, *args: Any, **kwargs: Any) -> list[str]:
        states = dict(self.request_states)  # aborts are rare; the states are gone afterwards
        aborted = orig(self, request_ids, *args, **kwargs)
        for request_id in aborted:
            if (state := states.get(request_id)) is not None:
                _observe_finished(state, "abort")
        return aborted

    return abort_requests


# --- vLLM's own metric with adapter names -------------------------------------------------------

LORA_INFO_NAMES = 16
"""Adapter names one label of vLLM's `vllm:lora_requests_info` lists at most (then `+N more`)."""


def _capped(names: Any) -> Any:
    """A comma-joined name list, sorted (one order per set) and cut at LORA_INFO_NAMES."""
    if not isinstance(names, str) or not names:
        return names
    listed = sorted(names.split(","))
    extra = len(listed) - LORA_INFO_NAMES
    return ",".join(listed[:LORA_INFO_NAMES] + ([f"+{extra} more"] if extra > 0 else []))


class LatestSeriesGauge:
    """vLLM's `vllm:lora_requests_info` with bounded series: each `labels()` call first drops
    the earlier series, so the gauge holds one (the current running / waiting adapters, each
    list capped); stock vLLM keeps a series for every combination of names it ever saw."""

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge

    def labels(self, *args: Any, **labels: Any) -> Any:
        if (clear := getattr(self._gauge, "clear", None)) is not None:  # Ray's wrapper has none
            clear()
        return self._gauge.labels(
            *(_capped(a) for a in args), **{k: _capped(v) for k, v in labels.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gauge, name)


def _wrap_stat_logger_init(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        if getattr(self, "gauge_lora_info", None) is not None:
            self.gauge_lora_info = LatestSeriesGauge(self.gauge_lora_info)

    return __init__


async def refresh_live_gauges(engine: Any, models: Any) -> None:
    """Set the scrape-time gauges (requests in flight, residency) from vLLM's engine client and
    its OpenAI model registry (the API server's, or a Ray Serve replica's)."""
    in_flight = None
    try:
        in_flight = dict(
            collections.Counter(
                _adapter_labels(s.lora_request)
                for s in list(engine.output_processor.request_states.values())
            )
        )
    except Exception as e:  # an engine client without these internals: the rest of /metrics
        _warn_once("in-flight", f"flora_vllm: adapter in-flight gauge unavailable: {e!r}")
    residency = None
    try:
        where: dict[int, str] = {}
        for rows in await engine.collective_rpc(RESIDENCY_RPC, timeout=10.0):
            for lora_id, location in rows:
                if where.get(lora_id) != "device":
                    where[lora_id] = location
        residency = [
            (*_adapter_labels(r), where.get(r.lora_int_id)) for r in models.lora_requests.values()
        ]
    except Exception as e:  # no LoRA, engine busy or dead: serve the rest of /metrics
        _warn_once("residency", f"flora_vllm: adapter residency unavailable: {e!r}")
    metrics.set_live_state(in_flight, residency)


_warned: set[str] = set()


def _warn_once(what: str, message: str) -> None:
    """One log line per kind of gauge failure per process (a scraper polls every few seconds)."""
    if what not in _warned:
        _warned.add(what)
        logger.warning("%s (logged once)", message)


class LiveGaugesMiddleware:
    """ASGI middleware: a `/metrics` scrape first refreshes the per-adapter gauges."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] == "http" and path.rstrip("/") == "/metrics" and "app" in scope:
            state = scope["app"].state
            engine = getattr(state, "engine_client", None)
            models = getattr(state, "openai_serving_models", None)
            if engine is not None and hasattr(models, "lora_requests"):
                await refresh_live_gauges(engine, models)
        await self.app(scope, receive, send)


def _wrap_init_middleware(orig: Callable) -> Callable:
    from starlette.middleware.cors import CORSMiddleware
    from vllm import envs
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    @functools.wraps(orig)
    def init_entrypoints_middleware(args: Any, app: Any, *rest: Any, **kwargs: Any) -> None:
        orig(args, app, *rest, **kwargs)
        app.add_middleware(LiveGaugesMiddleware)
        if tokens := [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]:
            # Ours checks every path but /health; vLLM's checks /v1 only: one check, not two.
            app.user_middleware = [
                m for m in app.user_middleware if m.cls is not AuthenticationMiddleware
            ]
            app.add_middleware(ApiKeyMiddleware, tokens=tokens)
        # CORS outermost (index 0 runs first): every response, a 401 included, carries its
        # headers, and a browser's preflight is answered before any key check (stock vLLM adds
        # CORS first, i.e. innermost, so its own 401s had none).
        cors = [m for m in app.user_middleware if m.cls is CORSMiddleware]
        app.user_middleware = cors + [m for m in app.user_middleware if m.cls is not CORSMiddleware]

    return init_entrypoints_middleware
