"""Start vLLM's OpenAI-compatible server with FLoRA defaults, as a child process or in place.

The server is vLLM's own (`vllm.entrypoints.openai.api_server`); the plugin is loaded by vLLM from
the entry point, so every vLLM server flag works unchanged. We only add defaults that make a
multi-adapter server start on a CPU box, and never override a flag the user gave.

Runs in: the CLI, test or benchmark process that starts the server (and checks vLLM first).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# flag -> value (None = bare switch); added only when the user did not pass the flag.
DEFAULT_FLAGS: dict[str, str | None] = {
    "--enable-lora": None,
    "--max-lora-rank": "8",
}
CPU_DEFAULT_FLAGS: dict[str, str | None] = {
    # The CPU backend reserves this share of RAM and refuses to start if less is free.
    "--gpu-memory-utilization": "0.3",
}
DEFAULT_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache on the CPU backend
}
RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # /v1/load_lora_adapter, /v1/unload_lora_adapter


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def server_argv(user_args: Sequence[str], on_cpu: bool | None = None) -> list[str]:
    """vLLM server arguments: the user's, plus our defaults for flags they did not give."""
    args = list(user_args)
    # `--no-enable-lora` gives `--enable-lora` too: a switch the user turned off stays off.
    given = {a.split("=", 1)[0].replace("--no-", "--", 1) for a in args if a.startswith("--")}
    defaults = dict(DEFAULT_FLAGS)
    if on_cpu if on_cpu is not None else not _has_cuda():
        defaults.update(CPU_DEFAULT_FLAGS)
    for flag, value in defaults.items():
        if flag not in given:
            args += [flag] if value is None else [flag, value]
    return args


ADAPTER_ROOT_FLAG = "--adapter-root"  # ours, not vLLM's: becomes FLORA_ADAPTER_ROOTS
RUNTIME_FLAG = "--allow-runtime-adapters"  # ours: runtime loading without a key or roots


def split_flora_flags(user_args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Take our own flags out of a server command line: (vLLM args, env settings for them).
    `--adapter-root DIR` (repeatable) sets FLORA_ADAPTER_ROOTS, read by every vLLM process;
    `--allow-runtime-adapters` sets VLLM_ALLOW_RUNTIME_LORA_UPDATING=1."""
    args, roots, env = [], [], {}
    it = iter(user_args)
    for a in it:
        if a == RUNTIME_FLAG:
            env[RUNTIME_ENV] = "1"
        elif a == ADAPTER_ROOT_FLAG:
            value = next(it, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"{ADAPTER_ROOT_FLAG} needs a directory")
            roots.append(value)
        elif a.startswith(ADAPTER_ROOT_FLAG + "="):
            roots.append(a.split("=", 1)[1])
        else:
            args.append(a)
    if roots:
        env["FLORA_ADAPTER_ROOTS"] = os.pathsep.join(os.path.abspath(r) for r in roots)
    return args, env


def runtime_loading(args: Sequence[str], env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """Whether /v1/load_lora_adapter and /v1/unload_lora_adapter are on, and why, as (env to
    add, start-up message). Runtime loading lets whoever reaches the port make the server read
    a folder, so it is on by default only behind an API key or allowed roots."""
    if RUNTIME_ENV in env:
        value = env[RUNTIME_ENV]
        state = "OFF" if value in ("", "0", "false", "False") else "ON"
        return {}, f"runtime adapter loading {state}: {RUNTIME_ENV}={value}"
    reasons = []
    if any(a == "--api-key" or a.startswith("--api-key=") for a in args) or env.get("VLLM_API_KEY"):
        reasons.append("--api-key")
    if env.get("FLORA_ADAPTER_ROOTS"):
        reasons.append("--adapter-root")
    if reasons:
        return {RUNTIME_ENV: "1"}, (
            "runtime adapter loading ON (/v1/load_lora_adapter, /v1/unload_lora_adapter): "
            + " and ".join(reasons)
        )
    return {}, (
        "runtime adapter loading OFF: with neither --api-key nor --adapter-root anyone who "
        "reaches the port could make the server read any folder; give one of them (or "
        f"{RUNTIME_FLAG}) to turn /v1/load_lora_adapter on"
    )


def server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the server: ours only where the caller has not set the variable."""
    env = dict(os.environ if base is None else base)
    for k, v in DEFAULT_ENV.items():
        env.setdefault(k, v)
    return env


def exec_server(user_args: Sequence[str]) -> None:
    """Replace this process with vLLM's OpenAI server (so signals and exit codes are vLLM's).
    Refuses to start on a vLLM the plugin cannot hook (the plugin alone would only log it)."""
    from flora_vllm.hooks import check_vllm

    if os.environ.get("FLORA_DISABLE") != "1":
        check_vllm()
    args, flora_env = split_flora_flags(user_args)
    env = server_env({**os.environ, **flora_env})
    runtime_env, message = runtime_loading(args, env)
    print(f"flora-vllm serve: {message}", file=sys.stderr, flush=True)
    if not _has_cuda():
        bind_env, bind_message = cpu_parallel_env(args, env)
        runtime_env.update(bind_env)
        if bind_message:
            print(f"flora-vllm serve: {bind_message}", file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", API_SERVER_MODULE, *server_argv(args)]
    os.execve(sys.executable, argv, {**env, **runtime_env})


OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def _flag_int(args: Sequence[str], names: Sequence[str], default: int = 1) -> int:
    """The last value of an integer flag given as `--flag N` or `--flag=N`."""
    value = default
    for i, a in enumerate(args):
        flag, eq, v = a.partition("=")
        if flag in names:
            v = v if eq else (args[i + 1] if i + 1 < len(args) else "")
            try:
                value = int(v)
            except ValueError:
                pass  # vLLM's own argument parser reports it
    return value


def cpu_parallel_env(
    args: Sequence[str], env: Mapping[str, str], cpus: Sequence[int] | None = None
) -> tuple[dict[str, str], str | None]:
    """On the CPU backend with more than one rank (tensor x pipeline parallel), vLLM binds each
    rank's OpenMP threads to cores from VLLM_CPU_OMP_THREADS_BIND; left to itself ("auto") it
    exits before ready on a small box. Unless set, give every rank its own share of the cores
    this process may use, e.g. "0|1" for 2 ranks on 2 cores. Returns (env to add, message)."""
    tp = _flag_int(args, ["--tensor-parallel-size", "-tp"])
    pp = _flag_int(args, ["--pipeline-parallel-size", "-pp"])
    ranks = tp * pp
    if ranks <= 1 or OMP_BIND_ENV in env:
        return {}, None
    cores = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cores) < ranks:
        return {}, (
            f"{ranks} parallel ranks on {len(cores)} core(s): not setting {OMP_BIND_ENV} "
            "(vLLM decides; set it to one core list per rank, separated by '|')"
        )
    share = len(cores) // ranks
    value = "|".join(
        ",".join(str(c) for c in cores[i * share : (i + 1) * share]) for i in range(ranks)
    )
    return {OMP_BIND_ENV: value}, f"{ranks} CPU ranks: {OMP_BIND_ENV}={value} (one share each)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A vLLM OpenAI server running as a child process on 127.0.0.1."""

    model: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    log_path: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> ServerProcess:
        """Start the server and wait until /health answers; raise with the log tail if not."""
        self.port = self.port or free_port()
        args, roots_env = split_flora_flags(self.args)
        argv = [
            sys.executable,
            "-m",
            API_SERVER_MODULE,
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *server_argv(args),
        ]
        env = server_env({**os.environ, **self.env, **roots_env})
        env.update(runtime_loading(args, env)[0])  # as `flora-vllm serve` decides
        if not _has_cuda():
            env.update(cpu_parallel_env(args, env)[0])
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f}s{self._tail()}")

    def _tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "\n--- server log tail ---\n" + "".join(f.readlines()[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lora_modules_args(adapters: Mapping[str, str]) -> list[str]:
    """`--lora-modules name=path ...` for vLLM."""
    if not adapters:
        return []
    return ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
