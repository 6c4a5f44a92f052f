"""`flora-vllm serve` adds its defaults only for flags the user did not give (or turned off)."""

from flora_vllm.server import server_argv


def test_defaults_fill_only_missing_flags():
    args = server_argv(["--model", "m", "--max-lora-rank", "16"], on_cpu=True)
    assert args.count("--max-lora-rank") == 1 and "16" in args
    assert "--enable-lora" in args
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.3"
    assert "--gpu-memory-utilization" not in server_argv(["--model", "m"], on_cpu=False)


def test_a_switch_turned_off_stays_off():
    args = server_argv(["--model", "m", "--no-enable-lora"], on_cpu=False)
    assert "--enable-lora" not in args and "--no-enable-lora" in args
