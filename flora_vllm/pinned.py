"""The version gate for private names of a dependency (vLLM in `hooks`, Ray in
`ray_serve._private`): the release must be a supported one and every target must exist, so an
upgrade fails loudly at start-up, naming every problem, instead of serving wrong answers.

Runs in: every process that installs hooks or builds the Ray app (no dependency imported here).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any


def resolve(module: str, dotted: str) -> tuple[Any, str, Any]:
    """(owner object, attribute name, current value) for `module` + `A.b` dotted attribute."""
    owner: Any = importlib.import_module(module)
    *parents, attr = dotted.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr, getattr(owner, attr)


def pin_problems(
    owner: str,
    dependency: str,
    found: str,
    supported: tuple[str, ...],
    install: str,
    targets: Iterable[tuple[str, str]],
    target_label: str,
) -> list[str]:
    """Every reason the installed release cannot take our targets (empty: all good): a version
    not in `supported`, then each (module, dotted attribute) target that is missing."""
    problems = []
    if found not in supported:
        problems.append(
            f"{owner} supports {dependency} {', '.join(supported)}, found {found}; "
            f"install {install}"
        )
    for module, attr in targets:
        try:
            resolve(module, attr)
        except (ImportError, AttributeError) as e:
            problems.append(f"{target_label} {module}.{attr} is missing ({e})")
    return problems


def fail_on(problems: list[str], header: str) -> None:
    """Raise RuntimeError listing every problem under `header` (nothing when there is none)."""
    if problems:
        raise RuntimeError(f"{header}:\n  - " + "\n  - ".join(problems))
