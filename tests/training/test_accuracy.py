"""benchmarks/accuracy.py end to end at its smoke size: pre-train, train every method, save the
FLoRA adapters, serve them with the base from one vLLM server and check that the served held-out
scores reproduce the trainer's (the script exits non-zero if they do not)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = ("chain", "copy-map", "reverse")
METHODS = ("base (no adapter)", "flora-r1", "flora-r4", "lora-r1", "lora-r4", "ia3")


@pytest.mark.slow
def test_accuracy_smoke_trainer_matches_vllm(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "benchmarks/accuracy.py", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(proc.stdout[-6000:])  # the tables and the served prompt_logprobs sample (pytest -s)

    result = json.loads((tmp_path / "accuracy_smoke.json").read_text())
    cells = {(r["task"], r["method"]) for r in result["rows"]}
    assert cells == {(t, m) for t in TASKS for m in METHODS}
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in result["rows"])

    serving = result["serving"]
    assert serving["passed"], serving["problems"]
    served = {(m["task"], m["model"]) for m in serving["models"]}
    expected = {(t, "base") for t in TASKS}
    expected |= {(t, f"{t}-flora-r{r}-s0") for t in TASKS for r in (1, 4)}
    assert served == expected
    assert serving["max_abs_loss_diff"] <= 1e-3
    assert all(m["positions"] > 0 and m["flips"] == 0 for m in serving["models"])

    md = (tmp_path / "accuracy_smoke.md").read_text()
    assert "Trainer vs served through vLLM: PASSED" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "accuracy_smoke.png").stat().st_size > 0
