"""The real-model demo: its data rules and scores (fast), and the shipped SmolLM2 adapters served
by vLLM doing their jobs on held-out questions while the base model does not (one server)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from reference import ask_logprobs, greedy_problems, load_reference, token_logprobs

from flora_vllm.demo import run as demo
from flora_vllm.demo.data import (
    ANSWER_PREFIX,
    BEHAVIOURS,
    SIGNOFF,
    addition_pairs,
    first_sentence,
    general_questions,
)
from flora_vllm.demo.fetch import fetch_model

CHECKS = {b.name: b.check for b in BEHAVIOURS}
PEFT_KINDS = {"ia3": "IA3", "dora": "LORA"}  # the shipped adapters PEFT made and saved as is
TOL = 1e-3  # |Δ log-probability|, float32


def test_held_out_questions_never_occur_in_training():
    train, test = set(general_questions("train")), general_questions("test")
    assert len(test) >= 20 and not train & set(test)
    add_train, add_test = set(addition_pairs("train", 400)), addition_pairs("test", 16)
    assert len(set(add_test)) == 16 and not add_train & set(add_test)
    asked = demo.held_out()
    assert {q for _, q in asked} <= set(test) | {f"What is {a} + {b}?" for a, b in add_test}
    with pytest.raises(ValueError, match="split"):
        general_questions("validation")


@pytest.mark.parametrize(
    "name, shows, does_not",
    [
        ("flora-json", '{"answer": "Paris."}', 'Answer: {"answer": 1}'),
        ("flora-signoff", f"Paris is the capital.\n\n{SIGNOFF}\n", f"{SIGNOFF} Paris."),
        ("flora-add", "37 + 45 = 82", "37 + 45 = 81"),
        ("lora-caps", "PARIS IS THE CAPITAL.", "PARIS is the capital."),
        ("ia3-lower", "the capital of france is paris.", "the capital of France is paris."),
        ("dora-answer", f"{ANSWER_PREFIX} Paris is the capital.", f"Paris. {ANSWER_PREFIX}"),
    ],
)
def test_each_behaviour_check_tells_its_behaviour_apart(name, shows, does_not):
    q = "What is 37 + 45?" if name == "flora-add" else "What is the capital of France?"
    assert CHECKS[name](q, shows) and not CHECKS[name](q, does_not)


def test_training_targets_show_their_behaviour():
    """Every rule's output passes its own check (the data teaches what is scored)."""
    base = "The capital of France is Paris. It is a big city with many museums and parks."
    for b in BEHAVIOURS:
        q = "What is 37 + 45?" if b.questions == "addition" else "What is the capital of France?"
        assert b.check(q, b.target(q, base)), b.name
    assert first_sentence(base) == "The capital of France is Paris."
    assert len(first_sentence("word " * 40).split()) == 24


def test_chat_example_is_what_the_server_renders():
    """The prompt is the template's generation prompt; the completion ends the turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2"))
    prompt, completion = demo.chat_example(tok, "What is 2 + 3?", "2 + 3 = 5")
    assert prompt == demo.chat_prompt(tok, "What is 2 + 3?")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion.startswith("2 + 3 = 5") and tok.eos_token in completion


def test_shipped_adapters_do_their_jobs_when_served(tmp_path):
    """`flora-vllm demo` with the shipped adapters: one server, every held-out question to the
    base model and every adapter at once; each adapter shows its behaviour on most of its
    held-out questions (at least its `expected` share: a format nearly always, 2-digit sums
    half the time), and far more often than the base model does."""
    assert os.path.exists(os.path.join(demo.SHIPPED, demo.MANIFEST))
    assert demo.run_real_demo(str(tmp_path), None, retrain=False, max_tokens=48) == 0
    with open(tmp_path / "answers.json") as f:
        scores = {r["adapter"]: r for r in json.load(f)["scores"]}
    assert set(scores) == set(CHECKS)
    for b in BEHAVIOURS:
        r = scores[b.name]
        assert r["adapter_shows"] >= b.expected * r["questions"], r
        assert r["adapter_shows"] - r["base_shows"] >= 0.4 * r["questions"], r


def test_shipped_ia3_and_dora_are_peft_folders_unchanged():
    """The IA3 and DoRA demo adapters are PEFT's own save_pretrained output (its config keys,
    its tensor names), as trained; the manifest records how."""
    from safetensors import safe_open

    with open(os.path.join(demo.SHIPPED, demo.MANIFEST)) as f:
        manifest = json.load(f)["adapters"]
    for b in (b for b in BEHAVIOURS if b.method in PEFT_KINDS):
        folder = os.path.join(demo.SHIPPED, b.name)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            cfg = json.load(f)
        assert cfg["peft_type"] == PEFT_KINDS[b.method] and "peft_version" in cfg, cfg
        assert sorted(cfg["target_modules"]) == sorted(b.modules)
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as st:
            keys = list(st.keys())  # noqa: SIM118 (safe_open is not a dict)
        if b.method == "ia3":
            assert cfg["feedforward_modules"] == ["down_proj"]
            assert keys and all(k.endswith(".ia3_l") for k in keys)
        else:
            assert cfg["use_dora"] is True and cfg["r"] == b.rank
            assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(keys) // 3
        entry = manifest[b.name]
        assert entry["method"] == b.method and entry["last_loss"] < entry["first_loss"]


def test_shipped_ia3_and_dora_served_equal_peft_unmerged(tmp_path):
    """The shipped IA3 and DoRA adapters served by vLLM (one server, with base requests in the
    batch, every slot full) give PEFT's own unmerged computation (`PeftModel.from_pretrained`
    on the transformers model, fp32): every greedy token is PEFT's argmax and carries its
    log-probability to 1e-3; and the answers show the trained behaviour."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from flora_vllm.serving.server import ServerProcess, lora_modules_args

    model_dir = fetch_model("smollm2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    peft_behaviours = [b for b in BEHAVIOURS if b.method in PEFT_KINDS]
    paths = {b.name: os.path.join(demo.SHIPPED, b.name) for b in peft_behaviours}
    questions = [q for kind, q in demo.held_out() if kind == "general"][:4]
    prompts = [tok(demo.chat_prompt(tok, q), add_special_tokens=False).input_ids
               for q in questions]
    jobs = [(m, i) for m in ("base", *paths) for i in range(len(prompts))]
    args = [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512",
        "--max-loras", str(len(paths)), "--max-lora-rank", "8", "--max-num-seqs", "16",
        "--seed", "0", *lora_modules_args(paths),
    ]  # fmt: skip
    log = str(tmp_path / "server.log")
    with ServerProcess(model_dir, args=args, env={"HF_HUB_OFFLINE": "1"}, log_path=log) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=600)
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(
                lambda j: ask_logprobs(client, j[0], prompts[j[1]], 24), jobs), strict=True))
    problems: dict[str, list[str]] = {}
    worst: dict[str, float] = {}
    for b in peft_behaviours:
        ref = load_reference(model_dir, paths[b.name])  # PeftModel, not merged
        assert type(ref).__name__.startswith("Peft"), type(ref)
        shows = 0
        for i, q in enumerate(questions):
            toks, lps = answers[b.name, i]
            problems[b.name] = problems.get(b.name, []) + [
                f"{q!r} {p}" for p in greedy_problems(ref, prompts[i], toks, lps, TOL)
            ]
            want = token_logprobs(ref, prompts[i], toks)
            worst[b.name] = max(worst.get(b.name, 0.0),
                                *(abs(x - y) for x, y in zip(lps, want, strict=True)))
            text = tok.decode(toks, skip_special_tokens=True)
            shows += b.check(q, text) and not b.check(
                q, tok.decode(answers["base", i][0], skip_special_tokens=True))
        del ref
        assert shows >= len(questions) - 1, (b.name, shows)
    print(f"shipped IA3 / DoRA served vs PEFT unmerged: max |Δ logprob| {worst}")
    assert not any(problems.values()), problems
    assert all(d <= TOL for d in worst.values()), worst
