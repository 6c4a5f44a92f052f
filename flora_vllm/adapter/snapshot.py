"""A loaded adapter's files, copied once into a folder the server owns: what the worker reads.

Why: the worker reads an adapter inside the engine's step, and vLLM's worker cache may read it
again later (an id it evicted comes back from its path). Reading the client's folder there lets
one slow or hung disk stall every tenant, and a folder rewritten in place serve requests other
weights than the ones they resolved. So the API server copies the folder (off its event loop,
under a timeout: `hooks.api_server`) and hands vLLM the copy, which never changes while its id
lives and goes when the id is released.

Each file is opened without blocking (`O_NONBLOCK`: a FIFO swapped in after the folder check
opens at once) and copied only if the open file is a regular file; the bytes copied are bounded
by FLORA_MAX_ADAPTER_MB, checked against the file's size before its first byte is read.

Runs in: the API server (or a Ray replica), in a thread of its adapter-reader pool.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence

from flora_vllm.adapter.config import FLoRAAdapterError
from flora_vllm.adapter.files import FolderLimitError, entries, folder_problems, inside

CHUNK = 1 << 20  # bytes per read


def _copy_file(src: str, dst: str, budget: int) -> int:
    """Copy one regular file, at most `budget` bytes; return the bytes copied. Raises
    ValueError (with the reason) for anything that is not a regular file or is too large."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped in after the folder check
            raise ValueError("is not a regular file (it changed while being read)")
        if st.st_size > budget:
            raise ValueError(f"holds {st.st_size} bytes, over what is left of the limit")
        copied = 0
        with open(dst, "xb") as out:
            while chunk := os.read(fd, min(CHUNK, budget - copied + 1)):
                copied += len(chunk)
                if copied > budget:
                    raise ValueError("grew past the limit while being read")
                out.write(chunk)
        return copied
    finally:
        os.close(fd)


def copy_adapter(src: str, dest_parent: str, limit_bytes: int, roots: Sequence[str] = ()) -> str:
    """Copy adapter folder `src` into a new folder under `dest_parent` and return its path.

    Raises FLoRAAdapterError listing every problem (an entry that is not a file or folder, a
    file resolving outside `roots`, more than `limit_bytes` in all); nothing is left behind."""
    label = repr(src)
    if problems := folder_problems(src):
        raise FLoRAAdapterError(label, problems)
    dest = tempfile.mkdtemp(prefix="adapter-", dir=dest_parent)
    problems, budget = [], limit_bytes
    try:
        for rel, path in entries(src):
            if os.path.isdir(path):
                os.makedirs(os.path.join(dest, rel), exist_ok=True)
                continue
            if roots and not inside(os.path.realpath(path), roots):
                problems.append(f"{rel!r} resolves outside the adapter roots")
                continue
            try:
                budget -= _copy_file(path, os.path.join(dest, rel), budget)
            except ValueError as e:
                problems.append(f"{rel!r} {e}")
            except OSError as e:
                problems.append(f"{rel!r} cannot be read ({e.strerror or e})")
        if budget < 0 or any("limit" in p for p in problems):
            problems.append(
                f"the adapter's files exceed FLORA_MAX_ADAPTER_MB ({limit_bytes // 2**20} MiB)"
            )
        if problems:
            raise FLoRAAdapterError(label, problems)
    except FolderLimitError as e:  # the folder changed after the check
        shutil.rmtree(dest, ignore_errors=True)
        raise FLoRAAdapterError(label, [str(e)]) from e
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
