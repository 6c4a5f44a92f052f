"""flora_vllm.config: settings from the environment, every bad value named at start-up."""

from __future__ import annotations

import pytest

from flora_vllm.config import FLoRAConfig


def _from(monkeypatch: pytest.MonkeyPatch, **env: str) -> FLoRAConfig:
    for name in ("FLORA_EXECUTION", "FLORA_MERGE_CACHE_MB", "FLORA_COMPILE", "FLORA_MAX_RANK",
                 "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return FLoRAConfig.from_env()


def test_defaults(monkeypatch):
    config = _from(monkeypatch)
    assert (config.execution, config.merge_cache_mb, config.compile) == ("auto", 512, True)


def test_compile_switch(monkeypatch):
    assert _from(monkeypatch, FLORA_COMPILE="0").compile is False
    with pytest.raises(ValueError, match="FLORA_COMPILE='yes'"):
        _from(monkeypatch, FLORA_COMPILE="yes")


def test_flora_rank_limit(monkeypatch):
    assert _from(monkeypatch).rank_limit(8) == (8, "--max-lora-rank 8")
    assert _from(monkeypatch, FLORA_MAX_RANK="1").rank_limit(8) == (1, "FLORA_MAX_RANK=1")
    with pytest.raises(ValueError, match="FLORA_MAX_RANK=-1"):
        _from(monkeypatch, FLORA_MAX_RANK="-1")
    with pytest.raises(ValueError, match="FLORA_MAX_RANK='one' is not an integer"):
        _from(monkeypatch, FLORA_MAX_RANK="one")


def test_every_problem_listed(monkeypatch):
    with pytest.raises(ValueError) as e:
        _from(monkeypatch, FLORA_EXECUTION="fast", FLORA_MERGE_CACHE_MB="-1")
    assert "FLORA_EXECUTION='fast'" in str(e.value) and "FLORA_MERGE_CACHE_MB=-1" in str(e.value)


def test_fused_on_a_cpu_needs_the_interpreter(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU runs the kernel compiled")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _from(monkeypatch, FLORA_EXECUTION="fused")
    assert _from(monkeypatch, FLORA_EXECUTION="fused", TRITON_INTERPRET="1").execution == "fused"
