"""Stand-ins for the few vLLM names the vendored LoRA kernels import, so they run without vLLM.

Written for this folder (not vendored); each mirrors vLLM 0.32.0's behaviour where the kernels
can see it:

    envs                       vllm.envs: the four flags the kernels read, parsed as vLLM does
    current_platform           vllm.platforms.current_platform: is_cuda, has_device_capability
    init_logger                vllm.logger.init_logger, with warning_once / info_once
    next_power_of_2            vllm.utils.math_utils.next_power_of_2
    async_tensor_h2d           vllm.utils.torch_utils.async_tensor_h2d (pinned, non-blocking)
    direct_register_custom_op  vllm.utils.torch_utils.direct_register_custom_op, in the
                               `vllm_vendored` namespace, for CUDA and CPU (the interpreter)
    triton, tl                 vllm.triton_utils: triton itself (these kernels need it)
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import Library, infer_schema

__all__ = [
    "async_tensor_h2d",
    "current_platform",
    "direct_register_custom_op",
    "envs",
    "init_logger",
    "next_power_of_2",
    "tl",
    "triton",
]


def _flag(name: str) -> Callable[[], bool]:
    return lambda: bool(int(os.getenv(name, "0")))


class _Envs:
    """vllm.envs: read at each access, as vLLM's module `__getattr__` does."""

    _READERS: dict[str, Callable[[], Any]] = {
        "VLLM_BATCH_INVARIANT": _flag("VLLM_BATCH_INVARIANT"),
        "VLLM_TUNED_CONFIG_FOLDER": lambda: os.getenv("VLLM_TUNED_CONFIG_FOLDER", None),
        "VLLM_LORA_DISABLE_PDL": _flag("VLLM_LORA_DISABLE_PDL"),
        "VLLM_LORA_ENABLE_DUAL_STREAM": _flag("VLLM_LORA_ENABLE_DUAL_STREAM"),
    }

    def __getattr__(self, name: str) -> Any:
        if name not in self._READERS:
            raise AttributeError(f"vllm.envs.{name} has no stand-in in _compat.py")
        return self._READERS[name]()


envs = _Envs()


class _Platform:
    """The CUDA platform's answers (vLLM picks CudaPlatform when torch is a CUDA build)."""

    def is_cuda(self) -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    def has_device_capability(self, capability: int, device_id: int = 0) -> bool:
        if not self.is_cuda():
            return False
        major, minor = torch.cuda.get_device_capability(device_id)
        return major * 10 + minor >= capability


current_platform = _Platform()


class _Logger(logging.LoggerAdapter):
    """vLLM's logger: a logging.Logger with `*_once` variants that log a message once."""

    @functools.lru_cache  # noqa: B019 (a handful of loggers, alive for the process anyway)
    def warning_once(self, msg: str) -> None:
        self.warning(msg)

    @functools.lru_cache  # noqa: B019
    def info_once(self, msg: str) -> None:
        self.info(msg)


def init_logger(name: str) -> _Logger:
    return _Logger(logging.getLogger(name), {})


def next_power_of_2(n: int) -> int:
    """The next power of 2 (inclusive)."""
    return 1 if n < 1 else 1 << (n - 1).bit_length()


def async_tensor_h2d(
    data: list, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Copy a host list to the device without blocking (staged in pinned memory on CUDA)."""
    pin = torch.cuda.is_available()
    return torch.tensor(data, dtype=dtype, device="cpu", pin_memory=pin).to(
        device, non_blocking=True
    )


_LIB = Library("vllm_vendored", "FRAGMENT")  # keep alive: ops live as long as their library


def direct_register_custom_op(
    op_name: str,
    op_func: Callable[..., Any],
    mutates_args: list[str] | None = None,
    fake_impl: Callable[..., Any] | None = None,
    tags: tuple[torch.Tag, ...] = (),
) -> None:
    """`torch.ops.vllm_vendored.<op_name>`, dispatched straight to `op_func` on CUDA and on the
    CPU (Triton's interpreter); a second registration of the same name is a no-op."""
    if hasattr(torch.ops.vllm_vendored, op_name):
        return
    _LIB.define(op_name + infer_schema(op_func, mutates_args=mutates_args or []), tags=tags)
    for key in ("CUDA", "CPU"):
        _LIB.impl(op_name, op_func, dispatch_key=key)
    if fake_impl is not None:
        _LIB._register_fake(op_name, fake_impl)
