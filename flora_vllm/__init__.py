"""flora-vllm: FLoRA adapters (W_i = W0 ∘ (B_i A_i), one shared matmul per batch) served by vLLM.

Where each piece runs (vLLM runs the plugin in each of its processes):

    plugin.py    entry point `vllm.general_plugins` (every vLLM process): installs the hooks
    config.py    FLORA_* settings, checked at start-up (every process)
    pinned.py    the version gate of a pinned dependency's private names (vLLM, Ray)
    hooks/       every touch of vLLM's private internals, version-checked; one module per
                 process: api_server, api_metrics, engine, worker_adapters, worker_step
    lifecycle.py the one adapter reference count and release (API server, Ray replica)
    layers/      <Base>WithFLoRA layers, one file per vLLM base-layer family (worker)
    models/      native vLLM models the plugin registers: GPTBigCode (worker)
    ops/         the FLoRA math once, torch and Triton, policy, merge cache (worker; no vLLM)
    adapter/     the adapter folder format: config, load (checks), save (no vLLM)
    serving/     `flora-vllm` commands, access rules, the roots' resolver, metrics (API server)
    ray_serve/   Ray Serve app: config, loader, replica, ingress, router (Ray processes)
    training/    train and convert adapters on ops' math (training process; no vLLM)
    testing/     tiny random models and adapters (tests, benchmarks)
    demo/        the real-model demo: fetch, data, run, shipped adapters (CLI process)
"""

__version__ = "0.1.0"
