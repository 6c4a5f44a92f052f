"""patches/<line>/: each line's diffs apply to its release (the installed one, and the other
tested line's released sources), and once applied the fixes work."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import vllm

from flora_vllm.hooks import minor

pytestmark = pytest.mark.line  # also run on the other vLLM line (`make test-line`)

ROOT = Path(__file__).parents[2] / "patches"
LINES = {"0.29": "0.29.0", "0.32": "0.32.0"}  # patches/<line>/ -> the release it is made for
INSTALLED_LINE = next(
    (line for line, v in LINES.items() if minor(v) == minor(vllm.__version__)), None
)
PATCHES = sorted((ROOT / INSTALLED_LINE).glob("*.patch")) if INSTALLED_LINE else []
SITE = Path(vllm.__file__).parents[1]


def _targets(patch: Path) -> list[str]:
    return [line.split()[1].split("/", 1)[1] for line in patch.read_text().splitlines()
            if line.startswith("+++ ")]


def _apply(patch: Path, root: Path, dry_run: bool) -> subprocess.CompletedProcess:
    args = ["patch", "-p1", "-s", "-d", str(root)] + (["--dry-run"] if dry_run else [])
    return subprocess.run(args, input=patch.read_text(), text=True, capture_output=True)


def test_every_line_has_the_same_patches():
    """The installed release has a line, and each line carries the same changes."""
    assert INSTALLED_LINE is not None, f"no patches/ line for vLLM {vllm.__version__}"
    names = {line: sorted(p.name for p in (ROOT / line).glob("*.patch")) for line in LINES}
    assert len(names["0.29"]) >= 12 and len(set(map(tuple, names.values()))) == 1, names


def _line_sources(line: str) -> Path:
    if line == INSTALLED_LINE:
        return SITE
    from test_vllm_range import release_sources

    return release_sources(LINES[line])


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
@pytest.mark.parametrize("line", sorted(LINES))
def test_all_patches_of_a_line_apply_in_order_to_its_release(line, tmp_path):
    """Upstream would take them together: each applies, on top of the ones before, to the
    release of its line (the installed one, or the other line's released sources)."""
    patches = sorted((ROOT / line).glob("*.patch"))
    source = _line_sources(line)
    for target in sorted({t for p in patches for t in _targets(p)}):
        os.makedirs(tmp_path / os.path.dirname(target), exist_ok=True)
        shutil.copy(source / target, tmp_path / target)
    for patch in patches:
        result = _apply(patch, tmp_path, dry_run=False)
        assert result.returncode == 0, (line, patch.name, result.stdout + result.stderr)


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_applies_to_installed_vllm(patch):
    result = _apply(patch, SITE, dry_run=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _patched_module(number: str, root: Path, target: str | None = None) -> ModuleType:
    """A file patch `number` changes (its only one, or `target`), patched under `root` and
    imported on its own."""
    patch = next(p for p in PATCHES if p.name.startswith(number))
    targets = _targets(patch)
    if target is None:
        (target,) = targets
    for each in targets:
        os.makedirs(root / os.path.dirname(each), exist_ok=True)
        shutil.copy(SITE / each, root / each)
    assert _apply(patch, root, dry_run=False).returncode == 0
    spec = importlib.util.spec_from_file_location(f"patched_{number}", root / target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_patched_cpu_ops_give_no_lora_to_tokens_without_adapter(tmp_path):
    ops = _patched_module("0001", tmp_path)
    x, lora_a = torch.ones(3, 4), torch.randn(2, 1, 5, 4)
    out = torch.zeros(3, 5)
    ops.bgmv_shrink(x, lora_a, out, torch.tensor([0, -1, 1]), 1.0)
    torch.testing.assert_close(out[1], torch.zeros(5))
    torch.testing.assert_close(out[0], lora_a[0, 0] @ x[0])
    # A NaN in the slot a token without adapter is clamped to must not reach its row.
    lora_a[0, 0, 0, 0] = float("nan")
    out = torch.zeros(2, 5)
    ops.bgmv_shrink(x[:2], lora_a, out, torch.tensor([-1, 1]), 1.0)
    torch.testing.assert_close(out[0], torch.zeros(5))
    assert bool(torch.isfinite(out[1]).all())


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_patched_prefix_cache_key_tells_reloads_apart(tmp_path):
    """0007 applied: the same adapter name under a new id hashes to a different key."""
    from types import SimpleNamespace

    from vllm.lora.request import LoRARequest

    utils = _patched_module("0007", tmp_path)

    def keys(lora_id: int) -> list[str]:
        req = SimpleNamespace(lora_request=LoRARequest("a", lora_id, "/x"))
        return utils._gen_lora_extra_hash_keys(req)

    assert keys(1) != keys(2) and keys(1) == keys(1)
    assert utils._gen_lora_extra_hash_keys(SimpleNamespace(lora_request=None)) == []


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_patched_step_adapters_keep_both_ids_of_one_name(tmp_path):
    """0011 applied: an old and a new id of one adapter name in one batch both get activated."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.lora.request import LoRARequest

    batch_module = _patched_module("0011", tmp_path, "vllm/v1/worker/gpu_input_batch.py")
    batch = SimpleNamespace(
        num_reqs=2,
        request_lora_mapping=np.array([80, 88]),
        lora_id_to_lora_request={80: LoRARequest("a", 80, "/a"), 88: LoRARequest("a", 88, "/a")},
    )
    ones = np.ones(2, dtype=np.int32)
    _, _, requests = batch_module.InputBatch.make_lora_inputs(batch, ones, ones)
    assert sorted(r.lora_int_id for r in requests) == [80, 88]


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_patched_v2_runner_keeps_both_ids_of_one_name(tmp_path):
    """0011 applied to the V2 model runner (CUDA's default): both ids of one name active."""
    import numpy as np
    from vllm.lora.request import LoRARequest

    utils = _patched_module("0011", tmp_path, "vllm/v1/worker/gpu/lora_utils.py")
    state = utils.LoraState(max_num_reqs=2)
    state.add_request("r0", 0, LoRARequest("a", 80, "/a"))
    state.add_request("r1", 1, LoRARequest("a", 88, "/a"))
    assert sorted(r.lora_int_id for r in state.get_activate_loras(["r0", "r1"])) == [80, 88]
    assert np.array_equal(state.lora_ids[:2], [80, 88])
