"""PEFT IA3 folders, served as they are: each learned vector is a rank-1 FLoRA factor.

PEFT's IA3 (`peft_type: "IA3"`, `adapter_model.safetensors` holding
`base_model.model.<module path>.ia3_l`) computes, per targeted linear module,

    feed-forward (`feedforward_modules`):  W0 (l ∘ x) + bias     l: [1, in]  -> a = l, b = 1
    any other target:                      l ∘ (W0 x + bias)     l: [out, 1] -> a = 1, b = l

which is FLoRA's y = b ∘ (W0 (a ∘ x)) + bias at rank 1, except that a non-feed-forward target
scales its bias too (Qwen2's q/k/v, StarCoder's c_attn): its factors carry `bias_scale = l`, and
the layer adds (l - 1) ∘ bias to that adapter's tokens.
The vector is read in the stored shape PEFT's forward uses (flattened), so `fan_in_fan_out`
changes nothing here. Like FLoRA folders, the header is checked before a tensor is read.

Runs in: the worker (loading; the API server only copies the folder), tests.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection, Mapping

import torch
from safetensors import SafetensorError, safe_open

from flora_vllm.adapter.config import CONFIG_NAME, FLoRAAdapterError, _read_config
from flora_vllm.adapter.load import FLoRAModuleWeights

PEFT_TYPE_IA3 = "IA3"
WEIGHTS_NAMES = ("adapter_model.safetensors",)  # PEFT's safe_serialization (its default)
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.ia3_l(?:\.weight)?$")


def _matches(spec: object, module: str) -> bool:
    """PEFT's rule: a string is a regex the full module path must match; a list names module
    path suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    if isinstance(spec, list):
        return any(module == t or module.endswith(f".{t}") for t in spec)
    return False


def _config(adapter_dir: str) -> tuple[dict, list[str]]:
    """The parsed config and its problems (unsupported options named)."""
    raw = _read_config(adapter_dir)  # never opens a FIFO or device
    problems = []
    for key in ("target_modules", "feedforward_modules"):
        value = raw.get(key)
        if key == "feedforward_modules" and value is None:
            continue
        if not (isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(t, str) for t in value
        ))):
            problems.append(f"`{key}` must be a list of names or a regex, got {value!r}")
    if raw.get("modules_to_save"):
        problems.append(
            f"modules_to_save {raw['modules_to_save']!r} (whole trained module copies) is not "
            "served; serve IA3 adapters without it"
        )
    return raw, problems


def load_ia3(
    adapter_dir: str,
    module_shapes: Mapping[str, tuple[int, int]],
    biased: Collection[str] = (),
    dtype: torch.dtype = torch.float32,
    map_name: Callable[[str], str | None] | None = None,
) -> dict[str, FLoRAModuleWeights]:
    """Read a PEFT IA3 folder as rank-1 FLoRA factors for the model's modules.

    Args:
        adapter_dir: the folder (`adapter_config.json`, `adapter_model.safetensors`).
        module_shapes: module path -> (out, in) of every linear module the server wraps.
        biased: the module paths among them that add a bias (a non-feed-forward vector scales
            it too: `bias_scale`).
        dtype: dtype of the returned factors.
        map_name: maps a module path of the file to the model's module name (None = same).
    Returns:
        module path -> factors (a [1, in], b [out, 1], bias_scale [out] or None).
    Raises:
        FLoRAAdapterError listing every problem (config, unknown or unwrapped module, wrong
        vector length, NaN/inf, a targeted module without its vector).
    """
    try:
        raw, problems = _config(adapter_dir)
    except (OSError, ValueError, RecursionError) as e:
        raise FLoRAAdapterError(adapter_dir, [f"{CONFIG_NAME} is not readable JSON: {e}"]) from e
    weights_path = next(
        (p for n in WEIGHTS_NAMES if os.path.isfile(p := os.path.join(adapter_dir, n))), None
    )
    if weights_path is None:
        raise FLoRAAdapterError(adapter_dir, [*problems, f"missing {WEIGHTS_NAMES[0]}"])
    ff_spec = raw.get("feedforward_modules") or []
    vectors: dict[str, tuple[torch.Tensor, bool]] = {}  # model path -> (l, feed-forward)
    named: set[str] = set()  # model paths the file has a tensor for (even a refused one)
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                m = _KEY_RE.match(key)
                if m is None:
                    problems.append(
                        f"unexpected tensor {key!r}: IA3 names are "
                        "base_model.model.<module path>.ia3_l"
                    )
                    continue
                path = (map_name(m["path"]) if map_name else m["path"]) or m["path"]
                if path not in module_shapes:
                    problems.append(
                        f"IA3 on module {m['path']!r} is not served: this server wraps only the "
                        "adaptable linear modules"
                    )
                    continue
                named.add(path)
                ff = _matches(ff_spec, m["path"])
                out_f, in_f = module_shapes[path]
                want = in_f if ff else out_f
                shape = f.get_slice(key).get_shape()
                if math.prod(shape) != want or (len(shape) == 2 and 1 not in shape):
                    kind = "feed-forward: one per input" if ff else "one per output"
                    problems.append(
                        f"{key} has shape {list(shape)}, expected {want} values ({kind})"
                    )
                    continue
                vectors[path] = (f.get_tensor(key), ff)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        problems.append(f"{os.path.basename(weights_path)} is not a readable safetensors file: {e}")
        raise FLoRAAdapterError(adapter_dir, problems) from e
    result: dict[str, FLoRAModuleWeights] = {}
    targets = raw.get("target_modules")
    for path, (out_f, in_f) in module_shapes.items():
        if path not in vectors:
            if path not in named and _matches(targets, path):  # PEFT: every target has one
                problems.append(f"module {path!r} is targeted but its ia3_l vector is missing")
            continue
        vec, ff = vectors[path]
        if not vec.is_floating_point() or not bool(torch.isfinite(vec).all()):
            problems.append(f"{path}.ia3_l holds NaN, inf or non-float values")
            continue
        l_vec = vec.reshape(1, -1).to(torch.float64)
        a = l_vec if ff else torch.ones(1, in_f, dtype=torch.float64)
        b = torch.ones(out_f, 1, dtype=torch.float64) if ff else l_vec.T
        bias_scale = l_vec[0].to(dtype) if not ff and path in biased else None
        result[path] = FLoRAModuleWeights(
            a.to(dtype).contiguous(), b.to(dtype).contiguous(), bias_scale
        )
    if problems:
        raise FLoRAAdapterError(adapter_dir, problems)
    return result
