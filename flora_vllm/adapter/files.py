"""What an adapter folder may hold before anything in it is opened: folders and regular files.

Why: opening a named pipe (or a device, or a socket) blocks or misbehaves, and the worker opens
adapter files inside the engine's step, so one such file in one tenant's folder stalled every
request of the server. `os.stat` never blocks on them, so the folder is checked entry by entry
first, symlinks followed (where they may point is the allowed roots' business:
`serving.access`). Any adapter kind, FLoRA or LoRA, goes through this check.

Runs in: the worker (before any adapter load) and any process that reads an adapter's config.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence

MAX_ENTRIES = 1000  # files and folders in one adapter folder (PEFT writes 2-4)
MAX_DEPTH = 8  # folder levels below an adapter folder (PEFT writes none)

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def entry_problem(path: str) -> str | None:
    """Why `path` cannot be part of an adapter (None: a regular file or a folder)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks; never opens the file
    except FileNotFoundError:
        return "is a broken symlink" if os.path.islink(path) else None
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"


def inside(path: str, roots: Sequence[str]) -> bool:
    """Whether resolved `path` lies in one of `roots` (resolved too)."""
    return any(os.path.commonpath([path, root]) == root for root in roots)


class FolderLimitError(ValueError):
    """An adapter folder with more entries or levels than any adapter has."""


def entries(adapter_dir: str) -> Iterator[tuple[str, str]]:
    """(path relative to `adapter_dir`, full path) of every entry below it, breadth first,
    symlinked folders followed; raises FolderLimitError past MAX_ENTRIES entries or MAX_DEPTH
    levels (a symlink loop, a folder built to exhaust the walk: os.walk recurses)."""
    seen, level = 0, [""]
    for depth in range(MAX_DEPTH + 1):
        below = []
        for rel in level:
            with os.scandir(os.path.join(adapter_dir, rel)) as it:
                names = sorted(e.name for e in it)
            for name in names:
                seen += 1
                if seen > MAX_ENTRIES:
                    raise FolderLimitError(f"the folder holds more than {MAX_ENTRIES} entries")
                sub = os.path.join(rel, name)
                full = os.path.join(adapter_dir, sub)
                yield sub, full
                if os.path.isdir(full):
                    below.append(sub)
        if not below:
            return
        if depth == MAX_DEPTH:
            raise FolderLimitError(f"the folder nests folders more than {MAX_DEPTH} deep")
        level = below


def folder_problems(adapter_dir: str) -> list[str]:
    """Every entry of an adapter folder (recursively) that is not a regular file or a folder,
    and a folder past MAX_ENTRIES entries or MAX_DEPTH levels; empty when the folder is fine
    or missing."""
    problems: list[str] = []
    if (own := entry_problem(adapter_dir)) is not None:
        return [f"the adapter path {own}"]
    if not os.path.isdir(adapter_dir):
        return []
    try:
        for rel, full in entries(adapter_dir):
            if (problem := entry_problem(full)) is not None:
                problems.append(f"{rel!r} {problem}")
    except FolderLimitError as e:
        problems.append(str(e))
    except OSError as e:
        problems.append(f"the folder cannot be listed ({e.strerror or e})")
    return problems
