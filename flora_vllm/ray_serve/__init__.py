"""Ray Serve: N replicas of the FLoRA-enabled vLLM engine behind one OpenAI-compatible endpoint.

Why: one URL for many engine replicas, with each adapter served by a replica that already holds
it. Everything runs on Ray Serve LLM's own stack (`LLMConfig`, `LLMServer`, `OpenAiIngress`,
`build_llm_deployment`); the plugin reaches every replica through its `vllm.general_plugins` entry
point, so this package only builds engine args and routes:

- `config.py`, `FloraServeConfig.llm_config()`: vLLM engine args, CPU or GPU placement, LoRA
  multiplexing (the CLI/driver process).
- `loader.py`, `LocalLoraModelLoader`: adapters from local folders (Ray 2.60 fetches only cloud
  URLs, which still work through Ray's own loader with `dynamic_lora_path`).
- `replica.py`, `FloraLLMServer`: when Serve's multiplex LRU evicts an adapter, vLLM forgets and
  frees it too (Ray 2.60's `LLMServer` only ever adds adapters to the engine); per-replica
  residency and affinity counters (each engine replica actor).
- `ingress.py`, `FloraIngress`: `model="<adapter>"` means `"<base>:<adapter>"`; `/v1/models` lists
  the adapters; `GET /flora/stats` gathers every replica's counters (the ingress actor).
- `router.py`, `AdapterAffinityRouter`: a request goes to a replica that holds its adapter unless
  that replica is overloaded (its queue exceeds the shortest by more than
  `imbalanced_threshold`), otherwise to the least-loaded replica (fewest adapters on ties), which
  loads it (where a handle sends requests to the replicas: the ingress actor).
- `app.py`, `build_app`, `app_builder`, `main`: the Serve app and `flora-vllm ray-serve` (the
  CLI/driver process; `python -m flora_vllm.ray_serve.app`).
- `_private.py`: every Ray internal the others use, checked against the pinned Ray (`check_ray()`)
  when the app is built and when a replica starts.

The public names below are loaded on first use, so that importing one module (Serve imports
`router`, `replica` or `ingress` in their own processes) does not import the rest;
`flora_vllm.ray_serve:app_builder` is the Serve `import_path` (docker/ray-cluster.yaml).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flora_vllm.ray_serve.app import APP_NAME, app_builder, build_app, main
    from flora_vllm.ray_serve.config import FloraServeConfig
    from flora_vllm.ray_serve.ingress import FloraIngress
    from flora_vllm.ray_serve.replica import FloraLLMServer
    from flora_vllm.ray_serve.router import AdapterAffinityRouter

_EXPORTS = {
    "APP_NAME": "app",
    "AdapterAffinityRouter": "router",
    "FloraIngress": "ingress",
    "FloraLLMServer": "replica",
    "FloraServeConfig": "config",
    "app_builder": "app",
    "build_app": "app",
    "main": "app",
}

__all__ = [
    "APP_NAME",
    "AdapterAffinityRouter",
    "FloraIngress",
    "FloraLLMServer",
    "FloraServeConfig",
    "app_builder",
    "build_app",
    "main",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
