"""`flora-vllm serve` adds its defaults only for flags the user did not give (or turned off)."""

import os

import pytest

from flora_vllm.serving.server import runtime_loading, server_argv, split_flora_flags


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


def test_runtime_loading_only_behind_a_key_or_roots(tmp_path):
    """Runtime loading lets whoever reaches the port make the server read a folder: off by
    default, on with --api-key or --adapter-root or the explicit flag, and said why."""
    env, message = runtime_loading(["--model", "m"], {})
    assert env == {} and "OFF" in message and "--api-key" in message
    for args, base in (
        (["--api-key", "k"], {}),
        (["--api-key=k"], {}),
        ([], {"VLLM_API_KEY": "k"}),
        ([], {"FLORA_ADAPTER_ROOTS": str(tmp_path)}),
    ):
        env, message = runtime_loading(args, base)
        assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"} and "ON" in message, (args, base)
    args, env = split_flora_flags(["--allow-runtime-adapters", "--x"])
    assert args == ["--x"] and env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    assert runtime_loading([], env) == ({}, "runtime adapter loading ON: "
                                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1")
    assert runtime_loading([], {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"})[1].startswith(
        "runtime adapter loading OFF")  # the user's own setting wins


def test_cpu_ranks_get_their_own_cores_unless_the_user_bound_them():
    from flora_vllm.serving.server import OMP_BIND_ENV, cpu_parallel_env

    assert cpu_parallel_env(["--model", "m"], {}, cpus=[0, 1]) == ({}, None)  # one rank
    env, msg = cpu_parallel_env(["--tensor-parallel-size", "2"], {}, cpus=[0, 1])
    assert env == {OMP_BIND_ENV: "0|1"} and OMP_BIND_ENV in msg
    env, _ = cpu_parallel_env(["-tp=2", "-pp", "2"], {}, cpus=range(8))
    assert env == {OMP_BIND_ENV: "0,1|2,3|4,5|6,7"}
    assert cpu_parallel_env(["-tp", "2"], {OMP_BIND_ENV: "0-1|2-3"}, cpus=[0, 1]) == ({}, None)
    env, msg = cpu_parallel_env(["-tp", "4"], {}, cpus=[0, 1])  # fewer cores than ranks
    assert env == {} and "4 parallel ranks on 2 core(s)" in msg
