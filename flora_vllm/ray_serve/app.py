"""The Serve application and the `flora-vllm ray-serve` command.

Runs in the CLI/driver process: `flora-vllm ray-serve` (`main`: join or start a cluster, deploy,
block until Ctrl-C), `serve run flora_vllm.ray_serve:app_builder`, or Serve's app-building task
for a RayService `import_path` (`app_builder`).

Why: Ray Serve's OpenAI app as `build_openai_app` composes it, with our engine replica
(`FloraLLMServer`), ingress (`FloraIngress`) and, through the config, router; `build_app` checks
the installed Ray first (`check_ray()`), so an upgrade fails before anything is deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import build_llm_deployment
from ray.serve.llm.ingress import make_fastapi_ingress

from flora_vllm.ray_serve._private import (
    DEFAULT_ENDPOINTS,
    check_ray,
    init_ingress_app,
    to_model_metadata,
)
from flora_vllm.ray_serve.config import FloraServeConfig
from flora_vllm.ray_serve.ingress import FloraIngress
from flora_vllm.ray_serve.replica import FloraLLMServer
from flora_vllm.serving.access import ApiKeyMiddleware

APP_NAME = "flora"


def build_app(cfg: FloraServeConfig) -> Application:
    """Ray Serve's OpenAI app (as `build_openai_app` composes it) with our server and ingress."""
    check_ray()  # a Ray upgrade fails here, before anything is deployed
    llm_config = cfg.llm_config()
    base = llm_config.model_id
    server = build_llm_deployment(
        llm_config, bind_kwargs={"adapters": cfg.adapters}, deployment_cls=FloraLLMServer
    )
    options = FloraIngress.get_deployment_options([llm_config])
    options["ray_actor_options"] = {"num_cpus": 0}  # it only forwards requests
    app = init_ingress_app()  # Ray's app (exception handling, CORS, HTTP metrics)
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, tokens=[cfg.api_key])  # outermost
    ingress = make_fastapi_ingress(
        FloraIngress, endpoint_map={**DEFAULT_ENDPOINTS, **FloraIngress.ENDPOINTS}, app=app
    )
    lora_paths = {base: cfg.dynamic_lora_path} if cfg.dynamic_lora_path else {}
    return serve.deployment(ingress, **options).bind(
        llm_deployments={base: server},
        model_cards={base: to_model_metadata(base, llm_config)},
        lora_paths=lora_paths,
        adapters={base: cfg.adapters},
        adapter_roots={base: cfg.adapter_roots},
    )


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run flora_vllm.ray_serve:app_builder model=... ` / a RayService `import_path`:
    `args` are `FloraServeConfig`'s fields."""
    return build_app(FloraServeConfig(**args))


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    bad = [i for i in items if "=" not in i]
    if bad:
        raise SystemExit(f"{what}: expected NAME=VALUE, got {bad}")
    return dict(i.split("=", 1) for i in items)


def parse_args(argv: Sequence[str]) -> tuple[FloraServeConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="flora-vllm ray-serve",
        description="Serve FLoRA/LoRA adapters from N vLLM replicas behind one OpenAI endpoint "
        "(Ray Serve LLM), each adapter routed to a replica that holds it.",
    )
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="base model (or --model)")
    p.add_argument("--model", help="base model folder or Hugging Face id")
    p.add_argument("--served-model-name", help="the base model's id (default: folder name)")
    p.add_argument("--adapters", "--lora-modules", nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--replicas", type=int, default=1)
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", dest="device", action="store_const", const="cpu")
    dev.add_argument("--gpu", dest="device", action="store_const", const="gpu")
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=8)
    p.add_argument("--adapters-per-replica", type=int, help="default max(max-loras, #adapters)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--kv-cache-gib", type=int, default=FloraServeConfig.kv_cache_gib)
    p.add_argument("--dynamic-lora-path", help="cloud folder of more adapters (s3://, gs://)")
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="adapters only from inside DIR (repeatable), as on `flora-vllm serve`",
    )
    p.add_argument("--imbalanced-threshold", type=int, default=16)
    p.add_argument("--engine-kwargs", type=json.loads, default={}, help="JSON: more vLLM args")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="engine env vars")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="require `Authorization: Bearer KEY` on every path (default $VLLM_API_KEY)",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (auto, ray://head:10001); default $RAY_ADDRESS, else a new "
        "local cluster",
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app-name", default=APP_NAME)
    a = p.parse_args(argv)
    model = a.model or a.model_pos
    if not model:
        p.error("give the base model: flora-vllm ray-serve MODEL or --model MODEL")
    cfg = FloraServeConfig(
        model=model,
        adapters=_pairs(a.adapters, "--adapters"),
        served_model_name=a.served_model_name,
        replicas=a.replicas,
        device=a.device or "auto",
        max_loras=a.max_loras,
        max_lora_rank=a.max_lora_rank,
        adapters_per_replica=a.adapters_per_replica,
        max_model_len=a.max_model_len,
        cpus_per_replica=a.cpus_per_replica,
        kv_cache_gib=a.kv_cache_gib,
        dynamic_lora_path=a.dynamic_lora_path,
        imbalanced_threshold=a.imbalanced_threshold,
        engine_kwargs=a.engine_kwargs,
        env=_pairs(a.env, "--env"),
        api_key=a.api_key,
        adapter_roots=a.adapter_root,
    )
    return cfg, a


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, else start a local one; True if we started it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters would write a token
    ray.init(address="local", include_dashboard=False)
    return True


def deploy(cfg: FloraServeConfig, host: str, port: int, app_name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxy and the app; return the endpoint URL once every replica is up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=app_name, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/v1"


def main(argv: Sequence[str] | None = None) -> int:
    """`flora-vllm ray-serve`: deploy, print the endpoint, block until Ctrl-C, shut down."""
    cfg, a = parse_args(list(sys.argv[1:] if argv is None else argv))
    import ray

    started = connect(a.address)
    t0 = time.monotonic()
    try:
        url = deploy(cfg, a.host, a.port, a.app_name)
        print(
            f"FLoRA on Ray Serve: {url}  ({cfg.replicas} x {cfg.served_model_name}, adapters "
            f"{sorted(cfg.adapters)}, up in {time.monotonic() - t0:.0f}s; stats: "
            f"{url.removesuffix('/v1')}/flora/stats; Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # a few seconds; a second Ctrl-C here would leave replicas running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("shutting down", flush=True)
        if started:
            serve.shutdown()
        else:
            serve.delete(a.app_name)
        ray.shutdown()
    return 0


if __name__ == "__main__":  # `python -m flora_vllm.ray_serve.app`: the real module, not a copy
    from flora_vllm.ray_serve.app import main as _main

    sys.exit(_main())
