"""Writing a FLoRA folder (training and conversion processes)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from flora_vllm.adapter.config import CONFIG_NAME, WEIGHTS_NAME, FLoRAAdapterConfig


def save_adapter(
    adapter_dir: str,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    flora_alpha: float = 1.0,
    base_model_name_or_path: str = "",
) -> None:
    """Write a FLoRA folder from module path -> (A [r, in], B [out, r]) (unscaled factors)."""
    os.makedirs(adapter_dir, exist_ok=True)
    targets = sorted({p.rsplit(".", 1)[-1] for p in factors})
    cfg = FLoRAAdapterConfig(r, targets, flora_alpha, base_model_name_or_path)
    with open(os.path.join(adapter_dir, CONFIG_NAME), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"base_model.model.{path}.flora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"base_model.model.{path}.flora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, os.path.join(adapter_dir, WEIGHTS_NAME))
