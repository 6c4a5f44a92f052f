"""PEFT DoRA folders (LoRA with `use_dora: true`), served as they are: a LoRA plus a rank-1 FLoRA
output scaling on the same token.

PEFT's DoRA (`tuners/lora/dora.py`) computes, per targeted linear module at inference,

    y = s ∘ (W0 x + scaling · B A x) + bias,   s = m / ||W0 + scaling · B A||  (per output row)

with m the saved `lora_magnitude_vector` [out], the row norms taken over the input dimension
(a constant once loaded), scaling = lora_alpha / r (/ sqrt(r) with `use_rslora`, per module with
`rank_pattern` / `alpha_pattern`) and the bias not scaled. That is FLoRA's b ∘ (W0 (a ∘ x)) +
bias at rank 1 with a = 1, b = s, plus vLLM's LoRA with the rows of B scaled by s. Here s is
computed once, in fp32, from the served model's unsharded W0; the LoRA part is handed to vLLM's
own loader as a plain LoRA folder (`write_plain_lora`). With m equal to the norms (PEFT's init)
and B = 0, s = 1: the base output.

Anything PEFT has that this does not serve (DoRA on embeddings or on a module the server does not
wrap, `lora_bias`, `fan_in_fan_out`, another LoRA variant next to DoRA) is refused by name.

Runs in: the worker (loading; the API server only copies the folder), tests. Torch only.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flora_vllm.adapter.config import CONFIG_NAME, FLoRAAdapterError, _read_config

WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's safe_serialization (its default)
_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(?:\.weight)?$"
)
# LoRA variants PEFT cannot combine with DoRA (`LoraLayer.resolve_lora_variant`): set next to
# use_dora, the folder is not one PEFT itself would load.
_OTHER_VARIANTS = ("alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config",
                   "use_bdlora", "velora_config")


@dataclass
class DoRAModule:
    """One DoRA module as the file holds it: a [r, in], b [out, r], PEFT's scaling, m [out]."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor


@dataclass
class DoRAAdapter:
    """A DoRA folder split into what serves it.

    lora_config: the adapter config as a plain LoRA (`use_dora` false), for vLLM's loader.
    lora_tensors: the file's LoRA tensors, magnitudes removed (names as PEFT saved them).
    modules: model module path -> its factors and magnitude.
    scales: model module path -> s [out] (fp32), the per-output scaling of that module (set by
        `with_scales` once the row norms are known).
    """

    lora_config: dict
    lora_tensors: dict[str, torch.Tensor]
    modules: dict[str, DoRAModule]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


def _pattern_value(pattern: object, module: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first key that matches the end of the module path at a
    `.` boundary gives the value."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _config_problems(raw: dict) -> list[str]:
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type must be 'LORA' for DoRA, got {raw.get('peft_type')!r}")
    if raw.get("use_dora") is not True:
        problems.append(f"`use_dora` must be true for a DoRA folder, got {raw.get('use_dora')!r}")
    for key in ("r", "lora_alpha"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            problems.append(f"`{key}` must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, dict) and all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, int | float) and v > 0
            for k, v in value.items()
        )):
            problems.append(f"`{key}` must map module patterns to positive numbers, got {value!r}")
    if raw.get("fan_in_fan_out"):
        problems.append(
            "fan_in_fan_out (Conv1D base layers, e.g. GPT-2) is not served for DoRA"
        )
    if raw.get("lora_bias"):
        problems.append("lora_bias is not served for DoRA (PEFT itself refuses the pair)")
    if raw.get("trainable_token_indices"):
        problems.append("trainable_token_indices (trained embedding rows) is not served for DoRA")
    variants = [k for k in _OTHER_VARIANTS if raw.get(k)]
    if isinstance(raw.get("init_lora_weights"), str) and raw["init_lora_weights"] == "mica":
        variants.append("init_lora_weights='mica'")
    if variants:
        problems.append(
            f"DoRA together with another LoRA variant ({', '.join(variants)}) is not served "
            "(PEFT cannot load the pair either)"
        )
    return problems


def read_dora(
    adapter_dir: str,
    base_weights: Mapping[str, torch.Tensor],
    map_name: Callable[[str], str | None] | None = None,
) -> DoRAAdapter:
    """Read a PEFT DoRA folder and compute each module's output scaling s from whole rows.

    Args:
        adapter_dir: the folder (`adapter_config.json`, `adapter_model.safetensors`).
        base_weights: module path -> W0 [out, in] (unsharded) of every linear module the server
            wraps; read only for the modules the adapter names.
        map_name: maps a module path of the file to the model's module name (None = same).
    Returns:
        the plain LoRA config and tensors, and s per adapted module (model paths).
    Raises:
        FLoRAAdapterError listing every problem (see `parse_dora`, `with_scales`).
    """
    shapes = {p: (w.shape[0], w.shape[1]) for p, w in base_weights.items()}
    dora = parse_dora(adapter_dir, shapes, map_name)
    norms = {p: row_norms_sq(m, base_weights[p]) for p, m in dora.modules.items()}
    return with_scales(adapter_dir, dora, norms)


def parse_dora(
    adapter_dir: str,
    module_shapes: Mapping[str, tuple[int, int]],
    map_name: Callable[[str], str | None] | None = None,
) -> DoRAAdapter:
    """Read and check a PEFT DoRA folder, without the base weights (s is not computed yet).

    Args:
        adapter_dir: the folder (`adapter_config.json`, `adapter_model.safetensors`).
        module_shapes: module path -> (out, in) (unsharded) of every linear module the server
            wraps.
        map_name: maps a module path of the file to the model's module name (None = same).
    Raises:
        FLoRAAdapterError listing every problem (config options not served, DoRA on a module not
        served, a module without its magnitude or a magnitude without its module, wrong lengths,
        NaN/inf in the magnitude).
    """
    try:
        raw = _read_config(adapter_dir)  # never opens a FIFO or device
    except (OSError, ValueError, RecursionError) as e:
        raise FLoRAAdapterError(adapter_dir, [f"{CONFIG_NAME} is not readable JSON: {e}"]) from e
    if not isinstance(raw, dict):
        raise FLoRAAdapterError(adapter_dir, [f"{CONFIG_NAME} must hold a JSON object"])
    problems = _config_problems(raw)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FLoRAAdapterError(adapter_dir, [*problems, f"missing {WEIGHTS_NAME}"])
    if problems:  # nothing read before the config is one this serves
        raise FLoRAAdapterError(adapter_dir, problems)
    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, str]] = {}  # model path -> kind -> key
    peft_path: dict[str, str] = {}  # model path -> the file's path (patterns match those)
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                m = _KEY_RE.match(key)
                if m is None:  # not LoRA's: vLLM's loader names it
                    tensors[key] = f.get_tensor(key)
                    continue
                path = (map_name(m["path"]) if map_name else m["path"]) or m["path"]
                parts.setdefault(path, {})[m["kind"]] = key
                peft_path[path] = m["path"]
                if m["kind"] == "lora_magnitude_vector":
                    shape = f.get_slice(key).get_shape()
                    out_f = module_shapes[path][0] if path in module_shapes else None
                    if out_f is not None and math.prod(shape) != out_f:
                        problems.append(
                            f"{key} has shape {list(shape)}, expected {out_f} values (one per "
                            "output)"
                        )
                        continue
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        problems.append(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}")
        raise FLoRAAdapterError(adapter_dir, problems) from e
    r, alpha = raw["r"], raw["lora_alpha"]
    modules: dict[str, DoRAModule] = {}
    for path, found in sorted(parts.items()):
        if any(k.startswith("lora_embedding") for k in found):
            problems.append(f"DoRA on embeddings ({path!r}) is not served")
            continue
        if path not in module_shapes:
            problems.append(
                f"DoRA on module {path!r} is not served: this server wraps only the adaptable "
                "linear modules"
            )
            continue
        if "lora_magnitude_vector" not in found:
            problems.append(f"module {path!r} has LoRA weights but its lora_magnitude_vector "
                            "is missing (every DoRA module has one)")
            continue
        if "lora_A" not in found or "lora_B" not in found:
            problems.append(f"module {path!r} has a lora_magnitude_vector but not both lora_A "
                            "and lora_B")
            continue
        if (mag_key := found["lora_magnitude_vector"]) not in tensors:
            continue  # wrong length, named above
        mag = tensors.pop(mag_key)
        a, b = tensors[found["lora_A"]], tensors[found["lora_B"]]
        out_f, in_f = module_shapes[path]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape != (out_f, a.shape[0]):
            problems.append(
                f"{path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit W0 "
                f"{[out_f, in_f]}"
            )
            continue
        if not mag.is_floating_point() or not bool(torch.isfinite(mag).all()):
            problems.append(f"{mag_key} holds NaN, inf or non-float values")
            continue
        rank = _pattern_value(raw.get("rank_pattern"), peft_path[path], r)
        alpha_m = _pattern_value(raw.get("alpha_pattern"), peft_path[path], alpha)
        scaling = alpha_m / (math.sqrt(rank) if raw.get("use_rslora") else rank)
        modules[path] = DoRAModule(a, b, scaling, mag.reshape(-1).float())
    if not modules and not problems:
        problems.append("no module has DoRA weights (lora_A, lora_B, lora_magnitude_vector)")
    if problems:
        raise FLoRAAdapterError(adapter_dir, problems)
    return DoRAAdapter({**raw, "use_dora": False}, tensors, modules)


def row_norms_sq(
    module: DoRAModule,
    w0: torch.Tensor,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_j (W0 + scaling · B A)²_ij in fp64 for the rows `rows` of the whole weight, over its
    columns `cols` (None: all), where w0 [len(rows), len(cols)] holds exactly those entries (a
    tensor-parallel shard); the squares of the other columns are another worker's part."""
    b = module.b if rows is None else module.b[rows]
    a = module.a if cols is None else module.a[:, cols]
    weight = w0.float() + module.scaling * (b.float() @ a.float())  # PEFT's W0 + scaling·BA
    return weight.square().sum(dim=1, dtype=torch.float64)


def with_scales(
    adapter_dir: str, dora: DoRAAdapter, norms_sq: Mapping[str, torch.Tensor]
) -> DoRAAdapter:
    """Set s = m / ||W0 + scaling·BA|| (fp32) per module from its whole-row squared norms.

    Raises:
        FLoRAAdapterError naming each module whose s is not finite (a zero or overflowing row).
    """
    problems = []
    for path, module in dora.modules.items():
        s = (module.magnitude.double() / norms_sq[path].sqrt()).float()
        if not bool(torch.isfinite(s).all()):
            problems.append(
                f"{path}: m / ||W0 + scaling·BA|| is not finite (a row of W0 + scaling·BA is "
                "zero or overflows)"
            )
            continue
        dora.scales[path] = s
    if problems:
        raise FLoRAAdapterError(adapter_dir, problems)
    return dora


def write_plain_lora(adapter: DoRAAdapter, out_dir: str) -> str:
    """Write the LoRA part as a plain PEFT LoRA folder (what vLLM's own loader reads)."""
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(adapter.lora_config, f)
    save_file({k: t.contiguous() for k, t in adapter.lora_tensors.items()},
              os.path.join(out_dir, WEIGHTS_NAME))
    return out_dir
