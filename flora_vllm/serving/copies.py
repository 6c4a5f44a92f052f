"""The API server's adapter copies: every file an adapter load touches is read here, in a small
thread pool under a timeout, so neither the event loop nor the engine's step ever waits on a
client's folder (`adapter.snapshot` says why the worker reads a copy). No vLLM import.

Runs in: the API server (or a Ray replica).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from flora_vllm.adapter import peft_type_and_problem
from flora_vllm.adapter.snapshot import copy_adapter
from flora_vllm.config import get_config
from flora_vllm.serving.access import check_adapter_path

logger = logging.getLogger("flora_vllm")

READERS = 4  # adapter reads at a time; a hung disk can hold at most these (calls queue)
QUEUED = 64  # reader threads alive at most (running or waiting); beyond, a read is a 503 at once
HEADER_SLACK = 16 * 2**20  # bytes of config and safetensors headers on top of the tensor limit
T = TypeVar("T")


class AdapterReadTimeoutError(TimeoutError):
    """An adapter folder was not read in time: the disk is slow or hung (HTTP 503, retry)."""


class CopyStorageError(RuntimeError):
    """The server cannot write its adapter copies (its own state, not the adapter's: 503)."""


_slots = threading.Semaphore(READERS)
_threads = threading.Semaphore(QUEUED)
_folder: str | None = None
_lock = threading.Lock()


def _own_folder() -> str:
    """This process's folder of copies under the snapshot root, removed at exit (and by the
    next server to start, should this one be killed)."""
    global _folder
    with _lock:
        if _folder is None:
            root = get_config().snapshot_root()
            os.makedirs(root, mode=0o700, exist_ok=True)
            _sweep(root)
            _folder = tempfile.mkdtemp(prefix=f"server-{os.getpid()}-", dir=root)
            atexit.register(shutil.rmtree, _folder, True)
        return _folder


def _sweep(root: str) -> None:
    """Remove the copies of servers that are gone (killed before their exit handler ran)."""
    for name in os.listdir(root):
        pid = name.split("-")[1] if name.startswith("server-") else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run(call: Future, fn: Callable[..., Any], args: tuple) -> None:
    """Body of a reader thread: wait for one of READERS slots, then run `fn` unless the caller
    gave up meanwhile (a cancelled call never touches the disk)."""
    try:
        with _slots:
            if not call.set_running_or_notify_cancel():
                return
            try:
                call.set_result(fn(*args))
            except BaseException as e:
                call.set_exception(e)
    finally:
        _threads.release()


def _start(fn: Callable[..., Any], *args: Any) -> Future:
    """`fn(*args)` in a daemon thread: a read stuck on a hung disk never holds up the
    process's exit (a thread pool's workers are joined at exit). At most QUEUED such threads
    live: with a hung disk, further reads fail at once instead of piling up threads."""
    if not _threads.acquire(blocking=False):
        raise AdapterReadTimeoutError(
            f"{QUEUED} adapter reads are already waiting on the disk: it is slow or not "
            "answering; other adapters are served meanwhile, retry later"
        )
    call: Future = Future()
    threading.Thread(
        target=_run, args=(call, fn, args), name="flora-adapter-read", daemon=True
    ).start()
    return call


async def off_loop(fn: Callable[..., T], *args: Any, what: str) -> T:
    """`fn(*args)` in a reader thread, waited for at most FLORA_ADAPTER_READ_TIMEOUT_S; on a
    timeout the caller gets AdapterReadTimeoutError naming `what`, and the call, left to
    finish in its thread (or never started, if still waiting for a slot), has its copy removed
    then."""
    timeout = get_config().read_timeout_s
    call = _start(fn, *args)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(call), timeout)
    except TimeoutError:
        call.add_done_callback(_discard_late)  # runs in the reader thread, loop or no loop
        raise AdapterReadTimeoutError(
            f"{what} was not read within {timeout:g} s (FLORA_ADAPTER_READ_TIMEOUT_S): the disk "
            "is slow or not answering; other adapters are served meanwhile, retry later"
        ) from None


def _discard_late(call: Future) -> None:
    """A copy that finished after its caller gave up is removed (a path result is a copy)."""
    if not call.cancelled() and call.exception() is None:
        result = call.result()
        if isinstance(result, tuple) and result and isinstance(result[0], str):
            logger.info("flora_vllm: an adapter read that timed out finished; copy %s removed",
                        result[0])
            discard(result[0])


SLOW_READ_ENV = "FLORA_TEST_SLOW_READ_S"
"""Test seam (off unless set): reading a folder whose name starts with `slow-` takes this many
seconds longer, as on a slow or hung disk."""


def _prepare(path: str) -> tuple[str, str | None] | None:
    """(copy of the folder, its peft_type), or None for a path that is not a local folder:
    the roots checked file by file, then the files copied. Raises CopyStorageError when the
    server cannot write its copies (503)."""
    cfg = get_config()
    check_adapter_path(path, cfg.adapter_roots)  # with roots, hub ids and URLs are refused
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        return None
    delay = os.environ.get(SLOW_READ_ENV)
    if delay and os.path.basename(os.path.normpath(local)).startswith("slow-"):
        time.sleep(float(delay))
    try:
        folder = _own_folder()
    except OSError as e:
        raise CopyStorageError(
            f"the server cannot keep adapter copies in {cfg.snapshot_root()!r} "
            f"(FLORA_SNAPSHOT_DIR): {e.strerror or e}"
        ) from e
    limit = cfg.max_adapter_mb * 2**20 + HEADER_SLACK
    copy = copy_adapter(local, folder, limit, cfg.adapter_roots)
    peft_type, _ = peft_type_and_problem(copy)  # the worker reports a broken config
    return copy, peft_type


async def prepare(path: str) -> tuple[str, str | None] | None:
    """Copy adapter folder `path` for the worker, off the event loop, with the timeout: (copy,
    peft_type), or None when `path` is not a local folder (vLLM resolves or refuses it).
    Raises AdapterPathRefusedError, FLoRAAdapterError, AdapterReadTimeoutError,
    CopyStorageError."""
    return await off_loop(_prepare, path, what=f"adapter folder {path!r}")


def is_copy(path: str) -> bool:
    """Whether `path` is one of the server's copies (the worker may read those)."""
    root = get_config().snapshot_root()
    return os.path.commonpath([os.path.realpath(path), root]) == root


def discard(copy: str) -> None:
    """Remove a copy (in a reader thread: never on the event loop)."""
    if is_copy(copy):
        try:
            _start(shutil.rmtree, copy, True)
        except AdapterReadTimeoutError:  # every reader thread taken: the copy is on our disk
            shutil.rmtree(copy, ignore_errors=True)
