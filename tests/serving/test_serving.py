"""End to end: vLLM's real OpenAI server, FLoRA + LoRA + base requests in one batch, checked
token by token against transformers running the dense model with each adapter merged in."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ADAPTERS, serve
from openai import OpenAI
from reference import ask_logprobs, load_reference, token_logprobs

from flora_vllm.serving.server import ServerProcess

TOL = 1e-3  # log-probability, float32
MAX_TOKENS = 8


def _prompts(seed: int = 0) -> list[list[int]]:
    """Token-id prompts sharing a 70-token prefix (2 KV blocks of 32 + 6), so prefix caching has
    something to reuse, and across adapters it must not."""
    rng = random.Random(seed)
    prefix = [rng.randrange(2, 500) for _ in range(70)]
    return [prefix + [rng.randrange(2, 500) for _ in range(5 + 7 * i)] for i in range(3)]


def _ask(client: OpenAI, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    return ask_logprobs(client, model, prompt, MAX_TOKENS)


def _prefix_cache_hits(server: ServerProcess) -> float:
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=30).text
    hits = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    ]
    assert hits, "vllm:prefix_cache_hits_total missing from /metrics"
    return sum(hits)


def run_mixed_batch(
    server: ServerProcess, paths: dict[str, str], adapters: tuple[str, ...] = ADAPTERS
) -> dict[str, float]:
    """Warm the prefix cache with one request per model, then send base + every adapter x 3
    prompts (18 requests) at once. Returns the max |Δ log-prob| vs the dense oracle per model."""
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
    prompts = _prompts()
    models = ["base", *adapters]
    warm = [(m, prompts[0]) for m in models]
    jobs = [(m, p) for m in models for p in prompts]
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda j: _ask(client, *j), warm))
        answers = list(pool.map(lambda j: _ask(client, *j), jobs))
    assert _prefix_cache_hits(server) > 0, "prefix caching was never exercised"

    refs = {m: load_reference(paths["base"], None if m == "base" else paths[m]) for m in models}
    worst: dict[str, float] = {}
    moved: dict[str, float] = {}
    for (model, prompt), (toks, lps) in zip(jobs, answers, strict=True):
        assert len(toks) == len(lps) > 0
        ref = token_logprobs(refs[model], prompt, toks)
        base = token_logprobs(refs["base"], prompt, toks)
        diff = max(abs(a - b) for a, b in zip(lps, ref, strict=True))
        shift = max(abs(a - b) for a, b in zip(lps, base, strict=True))
        worst[model] = max(worst.get(model, 0.0), diff)
        moved[model] = max(moved.get(model, 0.0), shift)
    print(f"max |Δ logprob| vs dense reference: {worst}")
    bad = {m: d for m, d in worst.items() if d > TOL}
    assert not bad, f"answers differ from the dense merged model: {bad}"
    still_base = [m for m in adapters if moved[m] < 0.05]
    assert not still_base, f"adapters that did not change the output: {still_base} ({moved})"
    return worst


@pytest.mark.line
def test_llama_mixed_batch_every_slot_full(llama_server, model_sets):
    """Also: the model ran compiled, with the adapter layers as opaque nodes (FLORA_COMPILE)."""
    run_mixed_batch(llama_server, model_sets["llama"])
    with open(llama_server.log_path) as f:
        log = f.read()
    assert "compilation kept with LoRA" in log and "Warming up model for the compilation" in log


def test_peft_ia3_in_a_mixed_batch_with_flora_lora_and_base(llama_server, model_sets, tmp_path):
    """A PEFT IA3 adapter (made by PEFT: its own init times a seeded perturbation), loaded at
    runtime as it is, in one concurrent batch with FLoRA, LoRA and base requests on the server
    whose slots are all taken: every answer equals the oracle's (for IA3: PEFT's own unmerged
    IA3 layers), IA3 answers differ from base; `/v1/models` lists it, and its requests count
    under adapter_type="ia3"."""
    import httpx

    from flora_vllm.testing.tiny import make_ia3_adapter

    paths = dict(model_sets["llama"])
    paths["ia3"] = make_ia3_adapter(
        paths["base"], str(tmp_path / "ia3"), ("k_proj", "v_proj", "down_proj"), ("down_proj",),
        seed=21,
    )
    http = httpx.Client(base_url=llama_server.url, timeout=300)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "ia3", "lora_path": paths["ia3"]})
    assert r.status_code == 200, r.text
    try:
        run_mixed_batch(llama_server, paths, ("flora-r2", "lora-r8", "ia3", "flora-r1"))
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["ia3"]["root"] == paths["ia3"]  # the client's folder, not the server's copy
        metrics = http.get("/metrics").text
        assert 'adapter="ia3",adapter_type="ia3"' in metrics
    finally:
        http.post("/v1/unload_lora_adapter", json={"lora_name": "ia3"})


def test_peft_dora_in_a_mixed_batch_with_ia3_flora_lora_and_base(
    llama_server, model_sets, tmp_path
):
    """A PEFT DoRA adapter of rank 4 (made by PEFT: its own init, a seeded random B and a
    perturbed magnitude, `use_rslora` on) and a PEFT IA3 adapter, loaded at runtime as they
    are, in one concurrent batch with FLoRA, LoRA and base requests on the server whose slots
    are all taken: every answer equals the oracle's (for DoRA and IA3: PEFT's own unmerged
    layers), DoRA answers differ from base; `/v1/models` lists it, and its requests count
    under adapter_type="dora"."""
    import httpx

    from flora_vllm.testing.tiny import make_dora_adapter, make_ia3_adapter

    paths = dict(model_sets["llama"])
    paths["dora"] = make_dora_adapter(
        paths["base"], str(tmp_path / "dora"), 4, ("q_proj", "v_proj", "o_proj", "down_proj"),
        seed=22, use_rslora=True,
    )
    paths["ia3"] = make_ia3_adapter(
        paths["base"], str(tmp_path / "ia3"), ("k_proj", "down_proj"), ("down_proj",), seed=23
    )
    http = httpx.Client(base_url=llama_server.url, timeout=300)
    for name in ("dora", "ia3"):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": paths[name]})
        assert r.status_code == 200, r.text
    try:
        run_mixed_batch(llama_server, paths, ("flora-r2", "lora-r8", "ia3", "dora", "flora-r1"))
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["dora"]["root"] == paths["dora"]  # the client's folder, not the copy
        metrics = http.get("/metrics").text
        assert 'adapter="dora",adapter_type="dora"' in metrics
    finally:
        for name in ("dora", "ia3"):
            http.post("/v1/unload_lora_adapter", json={"lora_name": name})


@pytest.mark.parametrize(
    ("arch", "targets", "feedforward"),
    [
        ("qwen2", ("q_proj", "k_proj", "v_proj", "down_proj"), ("down_proj",)),
        ("starcoder", ("c_attn", "c_proj", "c_fc"), ("c_fc",)),
    ],
)
def test_peft_ia3_scales_the_bias_of_biased_modules(arch, targets, feedforward, tmp_path):
    """IA3 on biased non-feed-forward modules (Qwen2's q/k/v, StarCoder's c_attn and c_proj)
    scales the bias too, l ∘ (W0 x + bias): a PEFT IA3 adapter loaded at runtime, in one
    concurrent batch with FLoRA, LoRA and base, answers as PEFT's own layers do."""
    import httpx

    from flora_vllm.testing.tiny import build_demo_set, make_ia3_adapter

    paths = build_demo_set(str(tmp_path / arch), arch)
    paths["ia3"] = make_ia3_adapter(paths["base"], str(tmp_path / "ia3"), targets, feedforward,
                                    seed=24)
    with serve(paths, len(ADAPTERS), str(tmp_path / "server.log")) as server:
        http = httpx.Client(base_url=server.url, timeout=300)
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "ia3", "lora_path": paths["ia3"]})
        assert r.status_code == 200, r.text
        run_mixed_batch(server, paths, ("flora-r1", "lora-r8", "ia3", "flora-r4"))


def test_llama_mixed_batch_eager(model_sets, tmp_path):
    """vLLM's own choice with LoRA on the CPU (no compilation) stays correct: FLORA_COMPILE=0."""
    env = {"FLORA_COMPILE": "0"}
    with serve(model_sets["llama"], 2, str(tmp_path / "server.log"), env=env) as server:
        run_mixed_batch(server, model_sets["llama"])
        with open(server.log_path) as f:
            assert "Warming up model for the compilation" not in f.read()


@pytest.mark.parametrize(
    ("arch", "max_loras", "execution"),
    [
        pytest.param("starcoder", len(ADAPTERS), "auto", marks=pytest.mark.line),
        ("llama", 1, "auto"),
        ("starcoder", 1, "auto"),
        ("llama", len(ADAPTERS), "expanded"),
        ("llama", len(ADAPTERS), "merged"),
        ("llama", len(ADAPTERS), "fused"),
        ("starcoder", len(ADAPTERS), "fused"),
    ],
    ids=[
        "starcoder-every-slot",
        "llama-max-loras-1",
        "starcoder-max-loras-1",
        "llama-expanded-only",
        "llama-merged-only",
        "llama-fused-interpreted",
        "starcoder-fused-interpreted",
    ],
)
def test_mixed_batch(arch, max_loras, execution, model_sets, tmp_path):
    """The default policy (auto), both fixed torch forms, and the fused Triton kernel (the CUDA
    path, here under Triton's interpreter inside the real server) give the oracle's answers."""
    env = {"FLORA_EXECUTION": execution}
    if execution == "fused":
        env["TRITON_INTERPRET"] = "1"
    with serve(model_sets[arch], max_loras, str(tmp_path / "server.log"), env=env) as server:
        run_mixed_batch(server, model_sets[arch])


_PEFT_TARGETS = {  # DoRA targets, IA3 targets, IA3 feed-forward targets
    "llama": (("q_proj", "v_proj", "o_proj", "down_proj"), ("k_proj", "v_proj", "down_proj"),
              ("down_proj",)),
    "starcoder": (("c_attn", "c_proj", "c_fc"), ("c_attn", "c_fc"), ("c_fc",)),
}


@pytest.mark.parametrize("arch", ["llama", "starcoder"])
def test_mixed_batch_tensor_parallel_2(arch, model_sets, tmp_path):
    """Tensor parallel 2 (two CPU ranks, one core each by `flora-vllm serve`'s default binding):
    every layer family sharded (column, row, packed qkv / gate_up, StarCoder's multi-query
    c_attn with its one k/v head replicated) answers the mixed batch like the dense oracle,
    PEFT DoRA (its row norms summed over the two ranks' shards) and IA3 included."""
    import httpx

    from flora_vllm.testing.tiny import make_dora_adapter, make_ia3_adapter

    paths = dict(model_sets[arch])
    dora_targets, ia3_targets, feedforward = _PEFT_TARGETS[arch]
    paths["dora"] = make_dora_adapter(paths["base"], str(tmp_path / "dora"), 4, dora_targets,
                                      seed=25)
    paths["ia3"] = make_ia3_adapter(paths["base"], str(tmp_path / "ia3"), ia3_targets,
                                    feedforward, seed=26)
    extra = ["--tensor-parallel-size", "2"]
    with serve(paths, len(ADAPTERS), str(tmp_path / "server.log"), extra) as server:
        http = httpx.Client(base_url=server.url, timeout=300)
        for name in ("dora", "ia3"):
            r = http.post("/v1/load_lora_adapter",
                          json={"lora_name": name, "lora_path": paths[name]})
            assert r.status_code == 200, r.text
        run_mixed_batch(server, paths, ("flora-r1", "flora-r4", "lora-r8", "dora", "ia3"))
        with open(server.log_path) as f:
            assert "world_size=2" in f.read().replace(" ", "")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_mixed_batch_llama_family(arch, tmp_path):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Mistral: the same layers, the same oracle."""
    from flora_vllm.testing.tiny import build_demo_set

    paths = build_demo_set(str(tmp_path / arch), arch)
    with serve(paths, len(ADAPTERS), str(tmp_path / "server.log")) as server:
        run_mixed_batch(server, paths)


def test_pipeline_parallel_with_adapters_is_refused_at_start(model_sets, tmp_path):
    """PP > 1 with adapters would crash on the first request (vLLM's CPU runner, eager LoRA):
    the server refuses at start-up and names the cause."""
    extra = ["--pipeline-parallel-size", "2"]
    server = serve(model_sets["llama"], 2, str(tmp_path / "server.log"), extra)
    with pytest.raises(RuntimeError, match="exited") as err:
        server.start(timeout=300)
    assert "--pipeline-parallel-size 2 are not supported" in str(err.value)
    assert "--tensor-parallel-size" in str(err.value)


@pytest.mark.slow
def test_starcoder_without_multi_query(tmp_path):
    """GPTBigCode with per-head k/v (c_attn rows interleaved per head in the checkpoint)."""
    from flora_vllm.testing.tiny import build_demo_set

    paths = build_demo_set(str(tmp_path / "mha"), "starcoder-mha")
    with serve(paths, len(ADAPTERS), str(tmp_path / "server.log")) as server:
        run_mixed_batch(server, paths)
