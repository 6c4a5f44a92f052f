"""The app's settings: `FloraServeConfig`, and the Ray Serve LLM config it makes.

Runs in the CLI/driver process (`flora-vllm ray-serve`, `serve run`, or Serve's app-building
task for a RayService `import_path`), before anything is deployed.

Why: one place checks every setting at once (all problems in one error) and turns them into
Ray Serve LLM's `LLMConfig`: only real vLLM engine args go to the engines, CPU or GPU placement,
Serve's multiplex LRU and vLLM's `max_cpu_loras` kept one size, and the adapter-affinity router.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.llm import LLMConfig

from flora_vllm.ray_serve.router import AdapterAffinityRouter
from flora_vllm.serving.server import DEFAULT_ENV


@dataclass
class FloraServeConfig:
    """One base model with its adapters, served by `replicas` engines."""

    model: str
    """Base model: a local folder (on every node) or a Hugging Face id."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter name -> local folder (FLoRA or PEFT LoRA), readable on every node."""
    served_model_name: str | None = None
    """The base model's id for clients (default: the folder's name); adapters are `<adapter>`
    or `<id>:<adapter>`. Must not contain ':'."""
    replicas: int = 1
    device: str = "auto"
    """`cpu`, `gpu`, or `auto` (GPU when the cluster, or without one this machine, has one)."""
    max_loras: int = 4
    """vLLM adapter slots per batch (`--max-loras`)."""
    max_lora_rank: int = 8
    adapters_per_replica: int | None = None
    """Adapters one replica keeps loaded (Serve's multiplex LRU and vLLM's `max_cpu_loras`, kept
    equal); default max(max_loras, number of adapters)."""
    max_model_len: int | None = None
    cpus_per_replica: float = 1.0
    """CPU only: Ray CPUs reserved for each engine (the replica actor itself takes none)."""
    kv_cache_gib: int = int(DEFAULT_ENV["VLLM_CPU_KVCACHE_SPACE"])
    """CPU only: `VLLM_CPU_KVCACHE_SPACE` for each engine."""
    dynamic_lora_path: str | None = None
    """Cloud folder (s3://, gs://, abfss://, azure://) of more adapters, loaded by Ray on demand
    as `<id>:<subfolder>`."""
    imbalanced_threshold: int = 16
    """Queue-length excess over the least-loaded replica at which adapter affinity gives way."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """More vLLM engine args (they override ours)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the engines (e.g. FLORA_EXECUTION)."""
    api_key: str | None = None
    """With a key, every path of the app needs `Authorization: Bearer <key>` (as `--api-key`
    on the vLLM server); Serve's own `/-/healthz` stays open."""
    adapter_roots: list[str] = field(default_factory=list)
    """Folders adapters may be read from (as `flora-vllm serve --adapter-root`): every adapter
    path is checked at start-up and the engines refuse any other (FLORA_ADAPTER_ROOTS)."""

    def __post_init__(self) -> None:
        self.served_model_name = self.served_model_name or os.path.basename(self.model.rstrip("/"))
        problems = []
        if ":" in self.served_model_name:
            problems.append(f"served model name {self.served_model_name!r} contains ':'")
        if self.replicas < 1:
            problems.append(f"replicas={self.replicas}; use >= 1")
        if self.device not in ("auto", "cpu", "gpu"):
            problems.append(f"device={self.device!r}; use cpu, gpu or auto")
        bad = [n for n in self.adapters if ":" in n or n == self.served_model_name]
        if bad:
            problems.append(f"adapter names {bad} contain ':' or equal the base model's name")
        if self.adapter_roots:
            from flora_vllm.serving.access import AdapterPathRefusedError, check_adapter_path

            self.adapter_roots = [os.path.realpath(r) for r in self.adapter_roots]
            problems += [f"adapter root {r!r} is not a directory"
                         for r in self.adapter_roots if not os.path.isdir(r)]
            for name, path in self.adapters.items():
                try:
                    check_adapter_path(path, self.adapter_roots)
                except (AdapterPathRefusedError, ValueError) as e:
                    problems.append(f"adapter {name!r}: {e}")
            if self.dynamic_lora_path:
                problems.append(
                    "dynamic_lora_path (a cloud folder) cannot be combined with adapter_roots"
                )
        if self.adapters_per_replica is not None and self.adapters_per_replica < self.max_loras:
            problems.append(
                f"adapters_per_replica={self.adapters_per_replica} < max_loras={self.max_loras}"
            )
        if problems:
            raise ValueError("invalid Ray Serve settings: " + "; ".join(problems))

    @property
    def capacity(self) -> int:
        """Adapters per replica, in Serve's multiplex LRU and in vLLM (`max_cpu_loras`)."""
        given = self.adapters_per_replica or self.engine_kwargs.get("max_cpu_loras")
        return given or max(self.max_loras, len(self.adapters))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import ray

        if ray.is_initialized():
            return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"

    def llm_config(self) -> LLMConfig:
        """Ray Serve LLM's config: only real vLLM engine args go into `engine_kwargs`."""
        cpu = self.resolved_device() == "cpu"
        engine_kwargs: dict[str, Any] = {
            "enable_lora": True,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "max_cpu_loras": self.capacity,
        }
        if cpu:  # as `flora-vllm serve` on a CPU: it reserves this share of RAM
            engine_kwargs |= {"dtype": "float32", "gpu_memory_utilization": 0.3}
        if self.max_model_len:
            engine_kwargs["max_model_len"] = self.max_model_len
        env = {k: v for k, v in os.environ.items() if k.startswith("FLORA_")}
        if self.adapter_roots:
            env["FLORA_ADAPTER_ROOTS"] = os.pathsep.join(self.adapter_roots)
        # Serve's multiplex cache is a replica's one resolver (LocalLoraModelLoader reads the
        # roots): vLLM's own, which the plugin turns on with roots, stays off in replicas.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "0"
        if cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        router = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": self.imbalanced_threshold},
        )
        return LLMConfig(
            model_loading_config={"model_id": self.served_model_name, "model_source": self.model},
            accelerator_config={"kind": "cpu"} if cpu else None,
            placement_group_config={"bundles": [{"CPU": self.cpus_per_replica}]} if cpu else None,
            engine_kwargs=engine_kwargs | self.engine_kwargs,
            lora_config={
                "max_num_adapters_per_replica": self.capacity,
                "dynamic_lora_loading_path": self.dynamic_lora_path,
            },
            runtime_env={"env_vars": env | self.env},
            deployment_config={
                "num_replicas": self.replicas,
                "ray_actor_options": {"num_cpus": 0} if cpu else {},
                "request_router_config": router,
            },
        )
