"""API-server process: adapter names become ids, and ids live as long as their requests.

Runs in vLLM's OpenAI API server (or a Ray Serve replica, which hosts the same objects).
Hooks (targets checked in `flora_vllm.hooks`):

- `BaseServing._maybe_get_adapters`: adapter resolution; each request gets its own copy of the
  LoRARequest, which holds a reference on the id while it lives (`flora_vllm.lifecycle`).
- `OpenAIServingModels.load_lora_adapter`: the folder is checked and copied off the event loop
  under a timeout (`serving.copies`; 503 when the disk does not answer) and vLLM gets the copy,
  which lives as long as the adapter id: the engine never reads a client's folder, and an id
  vLLM's worker cache evicts comes back with the same weights. An invalid adapter answers 400
  and running out of memory 503, not 500 (by error class, `load_failure`); a path outside
  FLORA_ADAPTER_ROOTS answers 403; a reload (`load_inplace`) gets a fresh adapter id, so
  requests in flight finish on the old weights and new ones get the new weights.
- `OpenAIServingModels.show_available_models`: an adapter's `root` is the client's folder.
- `OpenAIServingModels.resolve_lora` (and load / unload): the per-name locks live only while in
  use; stock vLLM keeps one for every name a client ever sent.
- `OpenAIServingModels.resolve_lora`, `BaseServing._check_model`: with adapter roots, an unknown
  `model` name is served from `<root>/<name>` (`serving.resolver`, registered in vLLM's
  `LoRAResolverRegistry`) through `load_lora_adapter`'s checks; its 403 / 400 / 503 keep their
  code and reason (stock vLLM turns all but a 400 into a 404).
- `OpenAIServingModels.unload_lora_adapter`: the engine drops an unloaded (or replaced) adapter
  once no request holds a reference on its id (stock vLLM keeps it until evicted).
- `AsyncLLM.generate`: a request the engine core refused for its adapter id (`engine.py`) is a
  503 with the engine's reason, not vLLM's bare 500.
- Test seam, only with FLORA_TEST_HOLD_DIR set: `AsyncLLM.add_request` holds `held-*` adapters'
  requests between resolution and the engine, so a test can force the unload race.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from flora_vllm.adapter import (
    AdapterResourcesError,
    FLoRAAdapterError,
)
from flora_vllm.hooks.api_metrics import forget_adapter_type, remember_adapter_type
from flora_vllm.lifecycle import ADAPTERS, retire
from flora_vllm.serving import copies, metrics
from flora_vllm.serving.access import AdapterPathRefusedError
from flora_vllm.serving.copies import AdapterReadTimeoutError, CopyStorageError

logger = logging.getLogger("flora_vllm")


# --- adapter lifetime: leases in the API server, release by count --------------------------


@functools.cache
def _leased_cls() -> type:
    """LoRARequest with weak references: one copy per request, alive while the request is."""
    from vllm.lora.request import LoRARequest

    class LeasedLoRARequest(LoRARequest, weakref=True):  # type: ignore[call-arg]
        """A request's own copy of its adapter's LoRARequest; while it lives, the request holds
        a reference on the adapter id (`lifecycle.ADAPTERS`). Compares and hashes exactly as the
        installed LoRARequest does (by name up to vLLM 0.33, by (name, id) from 0.34), with a
        plain LoRARequest on either side (msgspec would otherwise compare every field and
        refuse to hash)."""

        def __eq__(self, other: object) -> bool:
            # The stock method checks `isinstance(value, self.__class__)`: called on `other`, it
            # accepts this subclass; called on self it would refuse a plain LoRARequest.
            return isinstance(other, LoRARequest) and LoRARequest.__eq__(other, self)

        __hash__ = LoRARequest.__hash__

    return LeasedLoRARequest


def leased(lora: Any) -> Any:
    """A copy of `lora` that holds a reference on its adapter id until it is garbage-collected.

    Every place that can still hand the request to the engine (the handler's frame, the
    generators, the output processor's request state) holds this copy, so when it is gone no
    request of this resolution can reach the engine with this id any more."""
    cls = _leased_cls()
    copy = cls(**{f: getattr(lora, f) for f in lora.__struct_fields__})
    ADAPTERS.lease(copy, copy.lora_int_id)
    return copy


_pinned: dict[int, tuple[Any, Any]] = {}  # id(request) -> (request, leased LoRARequest)


def pin_adapter(request: Any, lora: Any) -> Callable[[], None]:
    """Resolve `request` (this very object) to `lora`'s id when vLLM's handler asks, even if the
    name was unloaded or replaced since: for a router (Ray Serve) that resolved the adapter
    before vLLM sees the request. Returns the unpin function; the pin holds a reference."""
    key = id(request)
    _pinned[key] = (request, leased(lora))  # the request itself is held: its id stays unique
    return lambda: _pinned.pop(key, None)


def _wrap_maybe_get_adapters(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _maybe_get_adapters(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        pinned = _pinned.get(id(request))
        if pinned is not None and pinned[0] is request:
            return pinned[1]
        lora = orig(self, request, *args, **kwargs)  # resolution: the name's current id
        return None if lora is None else leased(lora)

    return _maybe_get_adapters


_copy_of: dict[int, str] = {}  # adapter id -> the folder copy its worker reads (`serving.copies`)
_origin: dict[str, str] = {}  # that copy -> the folder the client named (shown in /v1/models)


def _retire(engine: Any, lora_id: int, on_release: Callable[[], None] | None = None) -> None:
    """`lifecycle.retire`, plus the id's metric-label cache entry and folder copy at its
    release (no request of the id is left to read them)."""

    def released() -> None:
        forget_adapter_type(lora_id)
        if (copy := _copy_of.pop(lora_id, None)) is not None:
            _origin.pop(copy, None)
            copies.discard(copy)
        if on_release is not None:
            on_release()

    retire(engine, lora_id, released)


# --- adapters in the API server: roots, reload, unload ---------------------------------------


VLLM_FAILURE_WRAPPERS = (
    "Call to add_lora method failed: ",  # EngineCore utility call -> API server
    "Worker failed with error '",  # MultiprocExecutor: worker process -> engine core
)
"""How vLLM 0.29 hands a failed `add_lora` across its process boundaries: only text, each hop
putting its own words in front of the exception's message; the type itself does not cross."""
# Each load error class of the plugin, by the HTTP answer it gets. Their messages start with
# the class's MESSAGE_PREFIX, which is how the class crosses the boundaries (`load_failure`).
LOAD_ERRORS: dict[type, tuple[HTTPStatus, str]] = {
    FLoRAAdapterError: (HTTPStatus.BAD_REQUEST, "BadRequestError"),
    AdapterResourcesError: (HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
}


def load_failure(error: BaseException | str) -> type | None:
    """The plugin's error class behind a failed adapter load: the exception's own class in
    the process that raised it; elsewhere (vLLM hands over only text) the class whose prefix
    starts the message once vLLM's hop wrappers are taken off the front (None: not ours)."""
    for cls in LOAD_ERRORS:
        if isinstance(error, cls):
            return cls
    text = str(error)
    stripped = True
    while stripped:
        stripped = False
        for wrapper in VLLM_FAILURE_WRAPPERS:
            if text.startswith(wrapper):
                text, stripped = text[len(wrapper) :], True
    for cls in LOAD_ERRORS:
        if text.startswith(cls.MESSAGE_PREFIX):
            return cls
    return None


def _load_error(lora_request: Any, e: Exception) -> Any:
    """Stock vLLM's answer to an engine load failure (missing folder 404, anything else 500),
    then `_load_status` (the plugin's error classes: 400 / 503)."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.exceptions import LoRAAdapterNotFoundError

    missing = LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
    if str(missing) in str(e):
        return create_error_response(missing)
    return create_error_response(str(e), "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)


def _load_status(result: Any) -> Any:
    """A load's 500 caused by one of the plugin's load errors gets that error's status: an
    invalid adapter is the client's fault (400), running out of memory is transient (503)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    error = result.error if isinstance(result, ErrorResponse) else None  # else: success text
    if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR:
        cls = load_failure(error.message)
        if cls is not None:
            error.code, error.type = LOAD_ERRORS[cls]
    return result


async def _reload(models: Any, request: Any, base_model_name: str | None) -> Any:
    """Replace adapter `request.lora_name` with the folder's current files under a fresh id."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.lora.request import LoRARequest

    name = request.lora_name
    async with models.lora_resolver_lock[name]:
        if not request.lora_path:
            return create_error_response(
                "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        old = models.lora_requests.get(name)
        new = LoRARequest(
            lora_name=name,
            lora_int_id=models.lora_id_counter.inc(1),
            lora_path=request.lora_path,
            is_3d_lora_weight=request.is_3d_lora_weight,
        )
        if base_model_name is not None and models.is_base_model(base_model_name):
            new.base_model_name = base_model_name
        elif old is not None:
            new.base_model_name = old.base_model_name
        try:
            await models.engine_client.add_lora(new)
        except Exception as e:
            return _load_error(new, e)
        models.lora_requests[name] = new
    if old is not None:
        _retire(models.engine_client, old.lora_int_id)
    logger.info("flora_vllm: reloaded adapter '%s' from '%s'", name, request.lora_path)
    return f"Success: LoRA adapter '{name}' reloaded."


class LockTable(weakref.WeakValueDictionary):
    """name -> asyncio.Lock, created on first use and kept only while a task holds or awaits
    it (`async with table[name]` keeps it alive): bounded by the names in use, not by every
    name ever sent, while two tasks on one name still share one lock."""

    def __getitem__(self, name: str) -> asyncio.Lock:
        lock = self.get(name)
        if lock is None:
            lock = self[name] = asyncio.Lock()
        return lock


def _bounded_locks(models: Any) -> None:
    """Swap vLLM's ever-growing `lora_resolver_lock` defaultdict for a LockTable (once; the
    locks in it move over, so a holder and a waiter still meet on the same lock)."""
    if not isinstance(models.lora_resolver_lock, LockTable):
        table = LockTable()
        table.update(models.lora_resolver_lock)
        models.lora_resolver_lock = table


def _folder_resolver(models: Any) -> Any:
    """The plugin's adapter-roots resolver among vLLM's, if registered (`serving.resolver`)."""
    from flora_vllm.serving.resolver import AdapterFolderResolver

    return next((r for r in models.lora_resolvers if isinstance(r, AdapterFolderResolver)), None)


def _wrap_resolve_lora(orig: Callable) -> Callable:
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    @functools.wraps(orig)
    async def resolve_lora(self: Any, lora_name: str) -> Any:
        """An unknown name found in the adapter roots loads through `load_lora_adapter` (with
        its checks and error codes: 403, 400, 503, each with the reason); anything else goes
        to vLLM's resolvers. One load per name: concurrent first requests wait for it."""
        _bounded_locks(self)
        resolver = _folder_resolver(self)
        if resolver is None or lora_name in self.lora_requests:
            return await orig(self, lora_name)
        resolving = self.__dict__.setdefault("_flora_resolving", LockTable())
        async with resolving[lora_name]:  # not vLLM's lock: load_lora_adapter takes that one
            if (known := self.lora_requests.get(lora_name)) is not None:
                return known
            try:  # stats the roots: off the event loop (a hung mount must not stall it)
                path = await copies.off_loop(resolver.find, lora_name, what="the adapter roots")
            except AdapterPathRefusedError as e:
                return create_error_response(str(e), "PermissionDenied", HTTPStatus.FORBIDDEN)
            except AdapterReadTimeoutError as e:
                return _unavailable(str(e))
            except ValueError as e:
                return create_error_response(str(e), "InvalidUserInput")
            if path is None:
                return await orig(self, lora_name)  # other resolvers, else vLLM's 404
            load = LoadLoRAAdapterRequest(lora_name=lora_name, lora_path=path)
            result = await self.load_lora_adapter(load)
            if isinstance(result, ErrorResponse):
                if result.error.code != HTTPStatus.NOT_FOUND:
                    return result
                # the folder is there: no adapter in it is a broken adapter, not a missing one
                return create_error_response(
                    f"'{path}' holds no adapter: {result.error.message}", "InvalidUserInput"
                )
            logger.info("flora_vllm: adapter '%s' served from '%s'", lora_name, path)
            # an unload may have raced the load: then the name is gone again, a 404
            return self.lora_requests.get(lora_name) or await orig(self, lora_name)

    return resolve_lora


def _wrap_check_model(orig: Callable) -> Callable:
    from vllm import envs
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def _check_model(self: Any, request: Any) -> Any:
        """With the adapter roots' resolver on, its 403 / 503 reach the client as they are
        (stock vLLM passes only a resolver's 400 through and makes the rest a 404)."""
        models, name = self.models, getattr(request, "model", None)
        if (
            name
            and envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING
            and hasattr(models, "lora_resolvers")
            and name not in models.lora_requests
            and not self._is_model_supported(name)
            and _folder_resolver(models) is not None
        ):
            result = await models.resolve_lora(name)
            if not isinstance(result, ErrorResponse):
                return None
            if result.error.code != HTTPStatus.NOT_FOUND:
                return result
        return await orig(self, request)

    return _check_model


def _unavailable(message: str) -> Any:
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(
        message, "ServiceUnavailableError", HTTPStatus.SERVICE_UNAVAILABLE
    )


async def _copy_for_worker(request: Any) -> tuple[Any, tuple[str, str | None] | None, Any]:
    """(request naming the server's copy of its folder, (copy, peft_type), None), or (request,
    None, error response): the folder is checked and copied off the event loop
    (`serving.copies`); (request, None, None) for a path that is not a local folder."""
    from vllm.entrypoints.serve import create_error_response

    try:
        prepared = await copies.prepare(request.lora_path)
    except AdapterPathRefusedError as e:
        return request, None, create_error_response(
            str(e), "PermissionDenied", HTTPStatus.FORBIDDEN
        )
    except (AdapterReadTimeoutError, CopyStorageError) as e:  # the server's state: retry
        return request, None, _unavailable(str(e))
    except ValueError as e:  # FLoRAAdapterError (what is wrong with the folder), a null byte
        return request, None, create_error_response(str(e), "InvalidUserInput")
    if prepared is None:  # not a local folder: vLLM's own resolution (hub id) or its 404
        return request, None, None
    _origin[prepared[0]] = request.lora_path
    return request.model_copy(update={"lora_path": prepared[0]}), prepared, None


def _wrap_load_lora_adapter(orig: Callable) -> Callable:
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def load_lora_adapter(self: Any, request: Any, base_model_name: str | None = None):
        _bounded_locks(self)
        if request.lora_name and self.is_base_model(request.lora_name):
            return create_error_response(
                f"adapter name '{request.lora_name}' is the served model's name; pick another",
                "InvalidUserInput",
            )
        prepared = None
        if request.lora_path:
            request, prepared, refusal = await _copy_for_worker(request)
            if refusal is not None:
                return refusal
        if request.load_inplace and request.lora_name in self.lora_requests:
            result = _load_status(await _reload(self, request, base_model_name))
        else:
            result = _load_status(await orig(self, request, base_model_name))
        if prepared is not None:
            copy, peft_type = prepared
            loaded = self.lora_requests.get(request.lora_name)
            if isinstance(result, ErrorResponse) or loaded is None or loaded.lora_path != copy:
                _origin.pop(copy, None)
                copies.discard(copy)
            else:  # the copy lives as long as the id; the metric label needs no file read
                _copy_of[loaded.lora_int_id] = copy
                remember_adapter_type(loaded.lora_int_id, peft_type)
        return result

    return load_lora_adapter


def _wrap_show_available_models(orig: Callable) -> Callable:
    @functools.wraps(orig)
    async def show_available_models(self: Any) -> Any:
        """`/v1/models`: an adapter's `root` is the folder the client named, not the copy."""
        listing = await orig(self)
        for card in listing.data:
            card.root = _origin.get(card.root, card.root)
        return listing

    return show_available_models


def _wrap_unload_lora_adapter(orig: Callable) -> Callable:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def unload_lora_adapter(self: Any, request: Any):
        _bounded_locks(self)
        old = self.lora_requests.get(request.lora_name) if request.lora_name else None
        result = await orig(self, request)
        if old is not None and not isinstance(result, ErrorResponse):
            name = old.lora_name

            def forget_series() -> None:  # its series go with its last request, unless the
                if name not in self.lora_requests:  # name was loaded again meanwhile
                    metrics.forget(name)

            _retire(self.engine_client, old.lora_int_id, forget_series)
        return result

    return unload_lora_adapter


@functools.cache
def _gone_error_cls() -> type:
    """vLLM's retryable generation error (a 503 with the message; plain GenerationError with
    status 503 where the installed vLLM has no RetryableRequestError)."""
    from vllm import exceptions

    base = getattr(exceptions, "RetryableRequestError", exceptions.GenerationError)

    class AdapterGoneRequestError(base):  # type: ignore[misc, valid-type]
        """The engine refused a request whose adapter id it had already dropped."""

        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.status_code = HTTPStatus.SERVICE_UNAVAILABLE

    return AdapterGoneRequestError


def _wrap_generate(orig: Callable) -> Callable:
    from flora_vllm.hooks.engine import GONE_MARK

    @functools.wraps(orig)
    async def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        """A request the engine core refused for its adapter id raises a 503 with the engine's
        reason (stock vLLM turns every error output into a bare 500 "Internal server error")."""
        outputs = orig(self, *args, **kwargs)
        try:
            async for out in outputs:
                if out.finished:
                    for o in out.outputs:
                        reason = o.stop_reason
                        if isinstance(reason, str) and reason.startswith(GONE_MARK):
                            raise _gone_error_cls()(reason[len(GONE_MARK) :])
                yield out
        finally:
            await outputs.aclose()  # vLLM aborts the request when its generator is closed

    return generate


HOLD_DIR_ENV = "FLORA_TEST_HOLD_DIR"
"""Test seam (off unless set): a request for an adapter named `held-*` stops between adapter
resolution and the engine, writes `<dir>/<request id>.held` and waits for `<dir>/release`; one
named `held-gone-*` then has its id removed from the engine directly, past the leases (as a
second API server or a bug could), so it reaches the engine core's refusal."""
HOLD_LIMIT_S = 300.0


def _wrap_add_request_hold(orig: Callable, folder: str) -> Callable:
    @functools.wraps(orig)
    async def add_request(self: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        lora = kwargs.get("lora_request")  # generate() passes it by name
        if lora is not None and lora.lora_name.startswith("held-"):
            with open(os.path.join(folder, f"{request_id}.held"), "w") as f:
                f.write(f"{lora.lora_name} {lora.lora_int_id}\n")
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not os.path.exists(os.path.join(folder, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{HOLD_DIR_ENV}: nobody released {request_id}")
                await asyncio.sleep(0.02)
            if lora.lora_name.startswith("held-gone-"):
                await self.remove_lora(lora.lora_int_id)
        return await orig(self, request_id, *args, **kwargs)

    return add_request
