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

MAX_ENTRIES = 1000  # files and folders in one adapter folder (PEFT writes 2-4)

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


def folder_problems(adapter_dir: str) -> list[str]:
    """Every entry of an adapter folder (recursively) that is not a regular file or a folder,
    and a folder of more than MAX_ENTRIES entries; empty when the folder is fine or missing."""
    problems: list[str] = []
    if (own := entry_problem(adapter_dir)) is not None:
        return [f"the adapter path {own}"]
    if not os.path.isdir(adapter_dir):
        return []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(adapter_dir):
        for name in dirnames + filenames:
            seen += 1
            if seen > MAX_ENTRIES:
                return [*problems, f"the folder holds more than {MAX_ENTRIES} entries"]
            full = os.path.join(dirpath, name)
            if (problem := entry_problem(full)) is not None:
                problems.append(f"{os.path.relpath(full, adapter_dir)!r} {problem}")
    return problems
