"""Reading and checking a FLoRA folder for a model's modules (the worker; tests, conversion).

`flora_model.safetensors` holds, per adapted linear module at transformers path P,
`base_model.model.P.flora_A.weight` [r, in] and `...flora_B.weight` [out, r]. The adapted weight
is W0 ∘ ((flora_alpha / r) · B @ A); all-ones factors with alpha 1 are the base. Every problem
found is collected and reported at once, with the adapter, module and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from flora_vllm.adapter.config import (
    _KEY_RE,
    WEIGHTS_NAME,
    FLoRAAdapterConfig,
    FLoRAAdapterError,
    load_config,
)


@dataclass
class FLoRAModuleWeights:
    """Factors of one adapted linear module: a [r, in], b [out, r] with the scale folded in;
    bias_scale [out] (IA3 on a biased non-feed-forward module) scales the bias too."""

    a: torch.Tensor
    b: torch.Tensor
    bias_scale: torch.Tensor | None = None


def load_adapter(
    adapter_dir: str,
    module_shapes: Mapping[str, tuple[int, int]],
    max_rank: int | None = None,
    rank_setting: str | None = None,
    dtype: torch.dtype = torch.float32,
    map_name: Callable[[str], str | None] | None = None,
    serve_dtype: torch.dtype | None = None,
) -> tuple[FLoRAAdapterConfig, dict[str, FLoRAModuleWeights]]:
    """Read a FLoRA folder and check it against the model before anything is served.

    Args:
        adapter_dir: the adapter folder.
        module_shapes: transformers module path -> (out_features, in_features) of every linear
            module of the model that FLoRA can adapt (e.g. "model.layers.0.self_attn.q_proj").
        max_rank: the server's rank limit (vLLM's --max-lora-rank); None for no limit.
        rank_setting: the setting that sets `max_rank`, named in the refusal (default
            `--max-lora-rank <max_rank>`).
        dtype: dtype of the returned factors.
        serve_dtype: the model's dtype, which the merged factor must fit (default `dtype`).
        map_name: maps a module path of the file to the model's module name (None = same).
    Returns:
        The config and, per module path, its factors with `flora_alpha / r` folded into b.
    Raises:
        FLoRAAdapterNotFoundError when the folder or config is missing; FLoRAAdapterError listing
        every problem otherwise (bad config, missing/corrupt weights, unknown or unadaptable
        modules, wrong shapes or dtypes, non-finite values, modules left out, rank too large).
    """
    cfg = load_config(adapter_dir)
    problems: list[str] = []
    if max_rank is not None and cfg.r > max_rank:
        rank_setting = rank_setting or f"--max-lora-rank {max_rank}"
        if rank_setting.startswith("FLORA_MAX_RANK"):
            fix = f"FLORA_MAX_RANK >= {cfg.r}"
        else:
            fix = f"--max-lora-rank >= {cfg.r} (vLLM allows 1, 8, 16, 32, 64, ...)"
        problems.append(f"rank {cfg.r} > {rank_setting}; restart the server with {fix}")
    short_names = {p.rsplit(".", 1)[-1] for p in module_shapes}
    for t in cfg.target_modules:
        if t not in short_names:
            problems.append(
                f"target module {t!r} is not a FLoRA-adaptable linear module of this model "
                f"(adaptable: {sorted(short_names)})"
            )
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        problems.append(f"missing weights file {WEIGHTS_NAME}")
        raise FLoRAAdapterError(adapter_dir, problems)
    # The header is read first: a tensor is read only once its name is a factor of a targeted
    # module of this model and its size fits one; stray or oversized tensors never are (a
    # crafted header could otherwise make the server allocate terabytes, or read every stray
    # tensor before refusing the file).
    largest = cfg.r * max((max(shape) for shape in module_shapes.values()), default=0)
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                where = _factor_of(key, cfg, module_shapes, map_name)
                if isinstance(where, str):
                    problems.append(where)
                    continue
                shape = f.get_slice(key).get_shape()
                if math.prod(shape) > largest:
                    problems.append(
                        f"tensor {key!r} has shape {list(shape)}, larger than any factor of this "
                        f"model at r={cfg.r}; not read"
                    )
                    continue
                path, ab = where
                found.setdefault(path, {})[ab] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        problems.append(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}")
        raise FLoRAAdapterError(adapter_dir, problems) from e

    result: dict[str, FLoRAModuleWeights] = {}
    for path, (out_f, in_f) in module_shapes.items():
        if path.rsplit(".", 1)[-1] not in cfg.target_modules:
            continue
        pair = found.get(path, {})
        missing = [ab for ab in "AB" if ab not in pair]
        if missing:
            problems.append(
                f"module {path!r} is targeted but flora_{'/'.join(missing)} is missing "
                "(every targeted module needs both factors; none may be left unadapted)"
            )
            continue
        a, b = pair["A"], pair["B"]
        bad = False
        for name, t, want in (("A", a, (cfg.r, in_f)), ("B", b, (out_f, cfg.r))):
            if not t.is_floating_point():
                problems.append(f"{path}.flora_{name} has dtype {t.dtype}, expected a float type")
                bad = True
            elif tuple(t.shape) != want:
                problems.append(
                    f"{path}.flora_{name} has shape {list(t.shape)}, expected {list(want)} "
                    f"(r={cfg.r})"
                )
                bad = True
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{path}.flora_{name} holds NaN or inf values")
                bad = True
        if not bad:
            w = FLoRAModuleWeights(
                a=a.to(torch.float64).to(dtype).contiguous(),
                b=(b.to(torch.float64) * cfg.scale).to(dtype).contiguous(),
            )
            if problem := _overflow(w, serve_dtype or dtype):
                problems.append(f"{path}: {problem}")
            else:
                result[path] = w
    if problems:
        raise FLoRAAdapterError(adapter_dir, problems)
    return cfg, result


def _factor_of(
    key: str,
    cfg: FLoRAAdapterConfig,
    module_shapes: Mapping[str, tuple[int, int]],
    map_name: Callable[[str], str | None] | None,
) -> tuple[str, str] | str:
    """(module path, "A" or "B") of a tensor name from the header, or why it is not a factor
    this adapter may carry."""
    m = _KEY_RE.match(key)
    if m is None:
        return (
            f"unexpected tensor {key!r}: names must be "
            "base_model.model.<module path>.flora_A.weight / .flora_B.weight"
        )
    path = (map_name(m["path"]) if map_name else m["path"]) or m["path"]
    if path not in module_shapes:
        return f"module {path!r} is not an adaptable linear module of this model"
    if path.rsplit(".", 1)[-1] not in cfg.target_modules:
        return f"module {path!r} has weights but is not in target_modules"
    return path, m["ab"]


def _overflow(w: FLoRAModuleWeights, dtype: torch.dtype) -> str | None:
    """Why factors that are finite on disk cannot be served in `dtype` (None: they can): a value
    or the merged factor (flora_alpha / r)·B@A overflows it (NaN answers for this adapter)."""
    limit = torch.finfo(dtype).max
    if not all(bool((t.abs() <= limit).all()) for t in (w.a, w.b)):
        return f"the factors overflow {dtype} once scaled by flora_alpha / r and cast"
    a, b = w.a.double(), w.b.double()
    bound = (b.abs().amax(dim=0) * a.abs().amax(dim=1)).sum()  # >= max |B @ A|, cheap
    if bound <= limit:
        return None
    worst = max(float((b[i : i + 1024] @ a).abs().max()) for i in range(0, b.shape[0], 1024))
    if worst > limit:
        return f"the merged factor (flora_alpha / r)·B@A reaches {worst:.3g}, over {dtype}'s max"
    return None
