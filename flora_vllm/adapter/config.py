"""The FLoRA adapter folder's config and errors (any process; torch-free, no vLLM).

A folder holds `adapter_config.json` ({"peft_type": "FLORA", "r", "flora_alpha", "target_modules",
"base_model_name_or_path"}) and `flora_model.safetensors` (`load.py` reads, `save.py` writes it).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from flora_vllm.adapter.files import entry_problem

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "flora_model.safetensors"
PEFT_TYPE = "FLORA"
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.flora_(?P<ab>[AB])\.weight$")


class FLoRAAdapterError(ValueError):
    """A FLoRA adapter folder that cannot be served; the message lists every problem."""

    MESSAGE_PREFIX = "Invalid adapter"  # the API server maps messages with it to HTTP 400

    def __init__(self, adapter: str, problems: list[str]):
        self.adapter = adapter
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{self.MESSAGE_PREFIX} {adapter}: {len(problems)} problem(s):\n{lines}"
        )


class AdapterResourcesError(RuntimeError):
    """Loading an adapter ran out of memory: the server's state at that moment, not the
    adapter's fault, so the client may retry (HTTP 503); nothing of the adapter stays loaded."""

    MESSAGE_PREFIX = "Out of memory loading adapter"  # the API server maps it to HTTP 503

    def __init__(self, adapter: str, cause: BaseException):
        self.adapter = adapter
        super().__init__(f"{self.MESSAGE_PREFIX} {adapter}: {type(cause).__name__}: {cause}")


class FLoRAAdapterNotFoundError(FileNotFoundError):
    """The adapter folder (or its config) does not exist."""


@dataclass
class FLoRAAdapterConfig:
    """`adapter_config.json` of a FLoRA adapter."""

    r: int
    target_modules: list[str]
    flora_alpha: float = 1.0
    base_model_name_or_path: str = ""
    peft_type: str = PEFT_TYPE
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The factor folded into B: flora_alpha / r."""
        return self.flora_alpha / self.r

    def to_dict(self) -> dict:
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            "flora_alpha": self.flora_alpha,
            "target_modules": list(self.target_modules),
            "base_model_name_or_path": self.base_model_name_or_path,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, raw: Mapping, adapter: str = "<adapter>") -> FLoRAAdapterConfig:
        """Check every field; raise one FLoRAAdapterError naming all that are wrong."""
        problems = []
        if raw.get("peft_type") != PEFT_TYPE:
            problems.append(f"peft_type is {raw.get('peft_type')!r}, expected {PEFT_TYPE!r}")
        r = raw.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            problems.append(f"`r` must be a positive integer, got {r!r}")
        alpha = raw.get("flora_alpha", 1.0)
        if (
            not isinstance(alpha, (int, float))
            or isinstance(alpha, bool)
            or not math.isfinite(alpha)
            or alpha == 0
        ):
            problems.append(f"`flora_alpha` must be a finite non-zero number, got {alpha!r}")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            targets = [targets]
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            problems.append(f"`target_modules` must be a non-empty list of names, got {targets!r}")
        base = raw.get("base_model_name_or_path", "") or ""
        if not isinstance(base, str):
            problems.append(f"`base_model_name_or_path` must be a string, got {base!r}")
        if problems:
            raise FLoRAAdapterError(adapter, problems)
        known = {"peft_type", "r", "flora_alpha", "target_modules", "base_model_name_or_path"}
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(r, list(targets), float(alpha), base, PEFT_TYPE, extra)


def _read_config(adapter_dir: str) -> object:
    """The parsed adapter_config.json; OSError (a FIFO or device is never opened: it would
    block) or ValueError / RecursionError for a file that is not JSON."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if (problem := entry_problem(path)) is not None:
        raise OSError(f"{CONFIG_NAME} {problem}")
    with open(path) as f:
        return json.load(f)


DORA_KIND = "LORA+use_dora"
"""What `peft_type_and_problem` names a PEFT LoRA folder with `use_dora` set: PEFT keeps DoRA
under peft_type LORA, vLLM's loader refuses it, this server loads it its own way
(`adapter.dora`, which also checks that the peft_type really is LORA)."""


def read_peft_type(adapter_dir: str) -> str | None:
    """peft_type named by a folder's adapter_config.json (None if absent or unreadable;
    DORA_KIND for a DoRA LoRA)."""
    return peft_type_and_problem(adapter_dir)[0]


def peft_type_and_problem(adapter_dir: str) -> tuple[str | None, str | None]:
    """(peft_type named by adapter_config.json, why the file is no config at all), read once;
    a LoRA with `use_dora` set is DORA_KIND. The problem is a JSON list or number, which would
    reach PEFT's parser as a raw TypeError; an absent or unreadable file gives (None, None): the
    loaders report those themselves."""
    try:
        raw = _read_config(adapter_dir)
    except (OSError, ValueError, RecursionError):
        return None, None
    if not isinstance(raw, dict):
        return None, f"{CONFIG_NAME} must hold a JSON object, got a JSON {type(raw).__name__}"
    if raw.get("peft_type") == "LORA" and raw.get("use_dora"):
        return DORA_KIND, None
    return raw.get("peft_type"), None


def load_config(adapter_dir: str) -> FLoRAAdapterConfig:
    """Read and check `adapter_config.json`."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir) or not os.path.isfile(path):
        raise FLoRAAdapterNotFoundError(f"No FLoRA adapter config at {path}")
    try:
        raw = _read_config(adapter_dir)
    except (OSError, ValueError, RecursionError) as e:
        raise FLoRAAdapterError(adapter_dir, [f"{CONFIG_NAME} is not valid JSON: {e}"]) from e
    if not isinstance(raw, dict):
        raise FLoRAAdapterError(adapter_dir, [f"{CONFIG_NAME} must hold a JSON object"])
    return FLoRAAdapterConfig.from_dict(raw, adapter_dir)
