"""Shared fixtures: tiny models with adapters (built once per session) and real vLLM servers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
# The test process only runs tiny reference models; on 2 cores shared with the vLLM servers under
# test, one thread is several times faster than two (the servers set their own threads).
torch.set_num_threads(1)

from flora_vllm.serving.server import ServerProcess, lora_modules_args  # noqa: E402
from flora_vllm.testing.tiny import build_demo_set  # noqa: E402

ADAPTERS = ("flora-r1", "flora-r2", "flora-r4", "flora-r8", "lora-r8")


@pytest.fixture(scope="session")
def model_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """arch -> {"base": model dir, adapter name: adapter dir} for LLaMA and StarCoder."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_demo_set(str(root / arch), arch) for arch in ("llama", "starcoder")}


def serve(
    paths: dict[str, str],
    max_loras: int,
    log_path: str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """A real `vllm.entrypoints.openai.api_server` (plugin loaded by vLLM) with every adapter,
    chunked prefill forced by a small token budget, prefix caching on."""
    adapters = {n: paths[n] for n in ADAPTERS}
    args = [
        "--served-model-name",
        "base",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(len(adapters) + 2),
        "--max-lora-rank",
        "8",
        "--max-num-seqs",
        "32",
        "--max-num-batched-tokens",
        "64",
        "--enable-chunked-prefill",
        "--enable-prefix-caching",
        "--block-size",
        "32",
        "--seed",
        "0",
        "--allow-runtime-adapters",  # the tests load and unload adapters without a key
        *lora_modules_args(adapters),
        *(extra or []),
    ]
    # No hub here: a missing local adapter must be a 404 at once, not a download attempt.
    env = {"HF_HUB_OFFLINE": "1", **(env or {})}
    return ServerProcess(paths["base"], args=args, env=env, log_path=log_path)


@pytest.fixture(scope="module")
def llama_server(
    model_sets: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """LLaMA server with every adapter slot filled (`--max-loras` = number of adapters)."""
    log = str(tmp_path_factory.mktemp("logs") / "llama-full.log")
    # Test seam: loading these two names fails in the worker as out-of-memory / a torch error.
    faults = {"FLORA_TEST_LOAD_FAULT": "fault-oom=MemoryError,fault-torch=RuntimeError"}
    # Test seam: folders named slow-* take 8 s to read; the server waits 5 s for a read.
    faults |= {"FLORA_TEST_SLOW_READ_S": "8", "FLORA_ADAPTER_READ_TIMEOUT_S": "5"}
    with serve(model_sets["llama"], len(ADAPTERS), log, env=faults) as server:
        yield server
