"""patches/: every diff still applies to the installed vLLM, and the CPU ops fix works."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import vllm

PATCHES = sorted((Path(__file__).parents[1] / "patches").glob("*.patch"))
SITE = Path(vllm.__file__).parents[1]


def _targets(patch: Path) -> list[str]:
    return [line.split()[1].split("/", 1)[1] for line in patch.read_text().splitlines()
            if line.startswith("+++ ")]


def _apply(patch: Path, root: Path, dry_run: bool) -> subprocess.CompletedProcess:
    args = ["patch", "-p1", "-s", "-d", str(root)] + (["--dry-run"] if dry_run else [])
    return subprocess.run(args, input=patch.read_text(), text=True, capture_output=True)


def test_there_are_patches():
    assert len(PATCHES) >= 6


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_applies_to_installed_vllm(patch):
    result = _apply(patch, SITE, dry_run=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_patched_cpu_ops_give_no_lora_to_tokens_without_adapter(tmp_path):
    patch = next(p for p in PATCHES if p.name.startswith("0001"))
    (target,) = _targets(patch)
    os.makedirs(tmp_path / os.path.dirname(target))
    shutil.copy(SITE / target, tmp_path / target)
    assert _apply(patch, tmp_path, dry_run=False).returncode == 0
    spec = importlib.util.spec_from_file_location("patched_lora_ops", tmp_path / target)
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    x, lora_a = torch.ones(3, 4), torch.randn(2, 1, 5, 4)
    out = torch.zeros(3, 5)
    ops.bgmv_shrink(x, lora_a, out, torch.tensor([0, -1, 1]), 1.0)
    torch.testing.assert_close(out[1], torch.zeros(5))
    torch.testing.assert_close(out[0], lora_a[0, 0] @ x[0])
