"""benchmarks/accuracy_real.py's data and scoring, fast (no training, no server): the task
generators make correct, disjoint train / validation / test splits, exact match reads the answer
up to the first newline, and the tokenizer splits every example cleanly at the prompt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.accuracy_real import (  # noqa: E402
    FULL,
    METHODS,
    REVERSE_WORDS,
    SMOKE,
    TASKS,
    ZORBISH,
    answer,
    exact_match,
    make_splits,
    served_summary,
    token_ids,
)


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_and_sized(task: str) -> None:
    cfg = FULL
    d = make_splits(task, cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    assert [len(d[s]) for s in ("train", "val", "test")] == [cfg.n_train, cfg.n_val, cfg.n_test]
    prompts = {s: {p for p, _ in d[s]} for s in d}
    assert all(len(prompts[s]) == len(d[s]) for s in d), "duplicate prompts in a split"
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert all(c.endswith("\n") and c.strip() for s in d for _, c in d[s])
    # Deterministic: the same seed gives the same data (every method trains on the same).
    assert make_splits(task, cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed) == d


def _key(task: str, prompt: str) -> frozenset:
    """What must not repeat across splits: the operand pair, the word set, the word pair."""
    if task == "add":
        return frozenset(prompt.rstrip("=").split("+"))
    body = prompt.split(":", 1)[1].removesuffix("->").split()
    return frozenset(body) if task == "reverse" else frozenset([tuple(body)])


@pytest.mark.parametrize("task", TASKS)
def test_no_leak_across_splits(task: str) -> None:
    d = make_splits(task, FULL.n_train, FULL.n_val, FULL.n_test)
    keys = {s: {_key(task, p) for p, _ in d[s]} for s in d}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["val"]
    assert not keys["val"] & keys["test"]


def test_targets_follow_the_rules() -> None:
    d = make_splits("add", 50, 10, 10)
    for p, c in d["train"]:
        a, b = p.rstrip("=").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and int(c) == int(a) + int(b)
    d = make_splits("reverse", 50, 10, 10)
    for p, c in d["train"]:
        words = p.removeprefix("reverse: ").removesuffix(" ->").split()
        assert len(set(words)) == 3 and set(words) <= set(REVERSE_WORDS)
        assert c == " " + " ".join(reversed(words)) + "\n"
    d = make_splits("zorbish", 50, 10, 10)
    for p, c in d["train"]:
        a, b = p.removeprefix("zorbish: ").removesuffix(" ->").split()
        assert a != b and c == f" {ZORBISH[a]} {ZORBISH[b]}\n"


def test_zorbish_every_word_seen_in_training() -> None:
    assert len(ZORBISH) == 30 and len(set(ZORBISH.values())) == 30
    assert not set(ZORBISH) & set(ZORBISH.values())
    for cfg in (FULL, SMOKE):
        if cfg is SMOKE:
            continue  # a few examples only: coverage is the full run's property
        d = make_splits("zorbish", cfg.n_train, cfg.n_val, cfg.n_test)
        seen = {w for p, _ in d["train"] for w in p.split()[1:3]}
        assert seen == set(ZORBISH)


def test_too_many_examples_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        make_splits("zorbish", 900, 10, 10)
    with pytest.raises(ValueError, match="unknown task"):
        make_splits("nope", 1, 1, 1)


def test_exact_match_reads_up_to_the_first_newline() -> None:
    assert answer(" sky cat red\nreverse: x") == "sky cat red"
    assert exact_match(" 82\n", "82\n")
    assert exact_match("82", "82\n")  # stopped at max tokens, no newline
    assert exact_match(" kav blom \n\n", " kav blom\n")
    assert not exact_match("821\n", "82\n")
    assert not exact_match("8 2\n", "82\n")
    assert not exact_match("\n82\n", "82\n")  # an empty first line is the answer
    assert not exact_match("", "82\n")


def _cached_tokenizer():
    from flora_vllm.demo.fetch import MODELS, cache_dir

    path = os.path.join(cache_dir(), MODELS["smollm2"].folder)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        pytest.skip("SmolLM2 not cached (flora-vllm fetch-model smollm2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_tokenizer_splits_every_example_at_the_prompt() -> None:
    tok = _cached_tokenizer()
    (newline,) = tok("\n", add_special_tokens=False).input_ids
    for w in (*REVERSE_WORDS, *ZORBISH):
        assert len(tok(" " + w, add_special_tokens=False).input_ids) == 1, w
    for task in TASKS:
        d = make_splits(task, FULL.n_train, FULL.n_val, FULL.n_test)
        for split in d.values():
            for prompt, completion in split:
                p, full = token_ids(tok, prompt, completion)  # raises if not a prefix
                assert full[-1] == newline and newline not in full[len(p) : -1]


def test_ia3_and_dora_are_trained_and_served_like_the_others() -> None:
    """IA3 and DoRA (r=1, 4: LoRA's ranks and lr grid) are methods of both runs, and the served
    column reports them from the serving check like any other method."""
    assert {"ia3", "dora-r1", "dora-r4"} <= set(METHODS) == set(FULL.methods) == set(SMOKE.methods)
    assert FULL.lrs["dora-r1"] == FULL.lrs["dora-r4"] == FULL.lrs["lora-r4"]
    models = [
        {"method": m, "served_exact_match": 0.5, "trainer_exact_match": 0.5, "answers_differ": 0,
         "answers": 6, "abs_loss_diff": 1e-6}
        for m in ("ia3", "dora-r4")
    ]
    result = {"serving": {"models": models}}
    assert served_summary(result, "ia3").startswith("yes: 0/6")
    assert served_summary(result, "dora-r4").startswith("yes: 0/6")
    assert served_summary(result, "dora-r1") == "not served"


def test_adapted_model_makes_peft_dora_and_ia3(tmp_path) -> None:
    """`adapted_model` gives PEFT's own DoRA (LoRA's config with use_dora) and IA3 (k, v, down;
    down feed-forward) on a tiny LLaMA."""
    from benchmarks.accuracy import adapted_model
    from flora_vllm.testing.tiny import TinySpec, build_llama

    base = build_llama(str(tmp_path / "m"), TinySpec(layers=1, hidden=128, intermediate=256))
    dora, params = adapted_model("dora-r4", base, 0)
    cfg = dora.peft_config["default"]
    assert cfg.use_dora and cfg.r == 4 and cfg.lora_alpha == 8
    assert any("lora_magnitude_vector" in n for n, p in dora.named_parameters() if p.requires_grad)
    ia3, _ = adapted_model("ia3", base, 0)
    cfg = ia3.peft_config["default"]
    assert set(cfg.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(cfg.feedforward_modules) == {"down_proj"}
