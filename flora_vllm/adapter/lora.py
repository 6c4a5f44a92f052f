"""PEFT LoRA folders, checked from the safetensors header before vLLM's loader reads a tensor.

Why: vLLM's own loader reads every tensor first and checks little: a module with `lora_A` but
no `lora_B` ended as a 500 (`NoneType * float` deep in vLLM), an `A` narrower than the layer was
copied into a corner of the slot and served as a model nobody trained, and a header declaring a
2 GiB tensor was read whole (5.6 GiB peak RSS) before any check. Here every tensor's name and
shape is read from the header alone (torch-free) and checked against the served model's layers,
every problem listed at once; only then does vLLM read the weights.

Runs in: the worker (`hooks.worker_adapters`, before vLLM's `LoRAModel.from_local_checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping

LORA_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.weight)?$")
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
          "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_header(path: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor a safetensors file declares, from its header only;
    ValueError for a file that is not one (size, JSON, offsets past the end)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            raise ValueError(f"header of {n} bytes does not fit the file ({size} bytes)")
        raw = json.loads(f.read(n))
    if not isinstance(raw, dict):
        raise ValueError("header is not a JSON object")
    tensors = {}
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not begin <= end <= size - 8 - n:
            raise ValueError(f"tensor {name!r}: malformed entry or data past the end of the file")
        tensors[name] = (dtype, list(shape))
    return tensors


def lora_problems(
    adapter_dir: str,
    module_shapes: Mapping[str, tuple[int, int]],
    max_bytes: int,
    map_name: Callable[[str], str | None] | None = None,
) -> list[str]:
    """Every reason the LoRA weights of `adapter_dir` cannot be served by a model whose adaptable
    linear modules have `module_shapes` ({module path: (out, in)}, unsharded), read from the
    header: more than `max_bytes` of tensors, a module with only one of `lora_A` / `lora_B`,
    `lora_A` not [r, in] or `lora_B` not [out, r] of that module, the two ranks apart. Tensors
    of other modules (embeddings, lm_head) are left to vLLM's loader. Empty: nothing to refuse
    (or no safetensors file: vLLM's loader reports it)."""
    path = os.path.join(adapter_dir, LORA_WEIGHTS)
    if not os.path.isfile(path):
        return []
    try:
        tensors = read_header(path)
    except (OSError, ValueError, RecursionError, struct.error) as e:
        return [f"{LORA_WEIGHTS} is not a readable safetensors file: {e}"]
    problems: list[str] = []
    total = sum(math.prod(shape) * _BYTES.get(dtype, 8) for dtype, shape in tensors.values())
    if total > max_bytes:
        problems.append(
            f"{LORA_WEIGHTS} declares {total / 2**20:.0f} MiB of tensors, over this server's "
            f"limit of {max_bytes / 2**20:.0f} MiB (FLORA_MAX_ADAPTER_MB); not read"
        )
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, (_, shape) in tensors.items():
        if (m := _KEY.match(name)) is None:
            continue
        module = (map_name(m["path"]) if map_name else m["path"]) or m["path"]
        pairs.setdefault(module, {})[m["ab"]] = shape
    for module, found in sorted(pairs.items()):
        if len(found) < 2:
            have, lack = ("A", "B") if "A" in found else ("B", "A")
            problems.append(
                f"module {module!r} has lora_{have} but no lora_{lack} (every adapted module "
                "needs both)"
            )
            continue
        if module not in module_shapes:
            continue  # not a linear layer the plugin knows: vLLM's loader checks it
        (out_f, in_f), a, b = module_shapes[module], found["A"], found["B"]
        rank = a[0] if len(a) == 2 else None
        if len(a) != 2 or a[1] != in_f:
            problems.append(f"{module}.lora_A has shape {a}, expected [r, {in_f}]")
        if len(b) != 2 or b[0] != out_f or (rank is not None and b[1] != rank):
            want = f"[{out_f}, {rank if rank is not None else 'r'}]"
            problems.append(f"{module}.lora_B has shape {b}, expected {want}")
    return problems
