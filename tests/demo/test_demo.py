"""The real-model demo: its data rules and scores (fast), and the shipped SmolLM2 adapters served
by vLLM doing their jobs on held-out questions while the base model does not (one server)."""

from __future__ import annotations

import json
import os

import pytest

from flora_vllm.demo import run as demo
from flora_vllm.demo.data import (
    BEHAVIOURS,
    SIGNOFF,
    addition_pairs,
    first_sentence,
    general_questions,
)
from flora_vllm.demo.fetch import fetch_model

CHECKS = {b.name: b.check for b in BEHAVIOURS}


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
