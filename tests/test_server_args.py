"""`flora-vllm serve` adds its defaults only for flags the user did not give (or turned off)."""

import os

import pytest

from flora_vllm.server import server_argv, split_flora_flags


def test_defaults_fill_only_missing_flags():
    args = server_argv(["--model", "m", "--max-lora-rank", "16"], on_cpu=True)
    assert args.count("--max-lora-rank") == 1 and "16" in args
    assert "--enable-lora" in args
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.3"
    assert "--gpu-memory-utilization" not in server_argv(["--model", "m"], on_cpu=False)


def test_a_switch_turned_off_stays_off():
    args = server_argv(["--model", "m", "--no-enable-lora"], on_cpu=False)
    assert "--enable-lora" not in args and "--no-enable-lora" in args


def test_adapter_root_flag_becomes_env(tmp_path):
    """`--adapter-root` is ours: it leaves vLLM's command line for FLORA_ADAPTER_ROOTS."""
    args, env = split_flora_flags(
        ["--max-loras", "2", "--adapter-root", str(tmp_path / "a"), f"--adapter-root={tmp_path}"]
    )
    assert args == ["--max-loras", "2"]
    assert env == {"FLORA_ADAPTER_ROOTS": os.pathsep.join([str(tmp_path / "a"), str(tmp_path)])}
    assert split_flora_flags(["--x"]) == (["--x"], {})
    with pytest.raises(ValueError, match="needs a directory"):
        split_flora_flags(["--adapter-root"])
