"""Engine-wide FLoRA settings, read once per process from the environment (vLLM starts several
processes, so flags cannot be passed to the workers directly; env vars reach all of them).

Runs in: every process (the CLI, vLLM's API server, engine core and workers, Ray replicas)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from flora_vllm.ops.policy import EXECUTIONS


@dataclass(frozen=True)
class FLoRAConfig:
    """Settings of the FLoRA layers."""

    execution: str = "auto"
    """How FLoRA tokens run: `auto` (per-segment cost model), `expanded` (rank rows per token
    through the shared matmul), `merged` (each adapter's merged weight) or `fused` (the Triton
    kernel; on a machine without CUDA under TRITON_INTERPRET=1 only: tests). CUDA layers always
    run the fused kernel. Env FLORA_EXECUTION."""

    merge_cache_mb: int = 512
    """Budget for merged weights kept across forward passes (0 = rebuild every time).
    Env FLORA_MERGE_CACHE_MB."""

    adapter_roots: tuple[str, ...] = ()
    """Directories adapters may be loaded from (resolved, symlinks followed); empty = anywhere.
    Env FLORA_ADAPTER_ROOTS, separated by `os.pathsep`; `flora-vllm serve --adapter-root DIR`."""

    max_rank: int = 0
    """Largest FLoRA rank a slot holds (0 = vLLM's `--max-lora-rank`). Every FLoRA stack is
    (max_loras + 1) x this x width per wrapped layer: with hundreds of rank-1 tenants next to a
    rank-8 LoRA, FLORA_MAX_RANK=1 makes each FLoRA slot 8x smaller. Env FLORA_MAX_RANK."""

    max_adapter_mb: int = 4096
    """Largest adapter a load may read, in MiB of tensor data as its safetensors header declares
    it (FLoRA and LoRA), checked before any tensor is read. Env FLORA_MAX_ADAPTER_MB."""

    read_timeout_s: float = 30.0
    """How long the API server waits for an adapter folder to be read and copied before it
    answers 503 (a slow or hung disk); the read runs in a thread, never on the event loop or in
    the engine's step. Env FLORA_ADAPTER_READ_TIMEOUT_S."""

    snapshot_dir: str = ""
    """Where the API server keeps the copies of loaded adapters that the workers read (empty:
    `flora-vllm-adapters-<uid>` in the system's temp folder). Env FLORA_SNAPSHOT_DIR."""

    compile: bool = True
    """Keep vLLM's compilation of the model on a CPU server with LoRA enabled (vLLM turns it off
    there; the adapter layers run as opaque nodes instead). Env FLORA_COMPILE=0: vLLM's eager."""

    def __post_init__(self) -> None:
        problems = []
        if self.execution not in EXECUTIONS:
            problems.append(
                f"FLORA_EXECUTION={self.execution!r}; use one of {', '.join(EXECUTIONS)}"
            )
        if self.execution == "fused":
            problems.extend(_fused_problems())
        if self.max_rank < 0:
            problems.append(f"FLORA_MAX_RANK={self.max_rank}; use 0 (--max-lora-rank) or >= 1")
        if self.max_adapter_mb <= 0:
            problems.append(f"FLORA_MAX_ADAPTER_MB={self.max_adapter_mb}; use a size >= 1")
        if not self.read_timeout_s > 0:
            problems.append(f"FLORA_ADAPTER_READ_TIMEOUT_S={self.read_timeout_s}; use seconds > 0")
        if self.merge_cache_mb < 0:
            problems.append(f"FLORA_MERGE_CACHE_MB={self.merge_cache_mb}; use a size >= 0")
        for root in self.adapter_roots:
            if not os.path.isdir(root):
                problems.append(f"FLORA_ADAPTER_ROOTS entry {root!r} is not a directory")
        if problems:
            raise ValueError("invalid flora_vllm settings: " + "; ".join(problems))

    @classmethod
    def from_env(cls) -> FLoRAConfig:
        cache_mb, max_rank, adapter_mb = (
            _int_env(k, d)
            for k, d in (
                ("FLORA_MERGE_CACHE_MB", "512"),
                ("FLORA_MAX_RANK", "0"),
                ("FLORA_MAX_ADAPTER_MB", "4096"),
            )
        )
        roots = os.environ.get("FLORA_ADAPTER_ROOTS", "")
        flag = os.environ.get("FLORA_COMPILE", "1")
        if flag not in ("0", "1"):
            raise ValueError(f"FLORA_COMPILE={flag!r}; use 1 (compile, default) or 0 (eager)")
        raw_timeout = os.environ.get("FLORA_ADAPTER_READ_TIMEOUT_S", "30")
        try:
            timeout = float(raw_timeout)
        except ValueError as e:
            raise ValueError(f"FLORA_ADAPTER_READ_TIMEOUT_S={raw_timeout!r} is not a number") from e
        return cls(
            execution=os.environ.get("FLORA_EXECUTION", "auto"),
            merge_cache_mb=cache_mb,
            adapter_roots=tuple(os.path.realpath(r) for r in roots.split(os.pathsep) if r),
            max_rank=max_rank,
            max_adapter_mb=adapter_mb,
            read_timeout_s=timeout,
            snapshot_dir=os.environ.get("FLORA_SNAPSHOT_DIR", ""),
            compile=flag == "1",
        )

    def snapshot_root(self) -> str:
        """The resolved folder that holds the API server's adapter copies (`snapshot_dir`)."""
        import tempfile

        default = os.path.join(tempfile.gettempdir(), f"flora-vllm-adapters-{os.getuid()}")
        return os.path.realpath(self.snapshot_dir or default)

    def rank_limit(self, max_lora_rank: int) -> tuple[int, str]:
        """(largest FLoRA rank a slot holds, the setting that says so) on a server whose
        `--max-lora-rank` is `max_lora_rank`."""
        if self.max_rank:
            return self.max_rank, f"FLORA_MAX_RANK={self.max_rank}"
        return max_lora_rank, f"--max-lora-rank {max_lora_rank}"


def _int_env(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not an integer") from e


def _fused_problems() -> list[str]:
    """Why FLORA_EXECUTION=fused cannot run in this process (empty when it can)."""
    from flora_vllm.ops.triton_ops import is_triton_available

    if not is_triton_available():
        return ["FLORA_EXECUTION=fused needs triton (pip install triton)"]
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return [
            "FLORA_EXECUTION=fused without a CUDA GPU runs the kernel under Triton's interpreter "
            "only: set TRITON_INTERPRET=1 too (slow; meant for tests), or use auto"
        ]
    return []


@functools.cache
def get_config() -> FLoRAConfig:
    """This process's settings (validated on first use; the plugin calls it at start-up)."""
    return FLoRAConfig.from_env()
