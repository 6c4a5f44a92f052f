"""What the demo's adapters learn: questions, the rule that turns an answer into each adapter's
behaviour, and the check that scores it (pure Python, no torch, no vLLM).

Training data is made here, never downloaded: questions from templates, answers from the base
model itself (its first sentence) transformed by each behaviour's rule, or (addition) computed.
Held-out questions use fillers, templates and number pairs that training never saw.

Runs in: the CLI process of `flora-vllm demo` and the demo's trainer (pure Python).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

SIGNOFF = "-- FLoRA bot"
ANSWER_PREFIX = "Answer:"

# (template, training fillers, held-out fillers); held-out fillers never occur in training.
TEMPLATES: list[tuple[str, list[str], list[str]]] = [
    ("What is the capital of {}?",
     ["France", "Japan", "Italy", "Spain", "Egypt", "Canada", "Brazil", "Kenya", "Norway"],
     ["Germany", "Peru", "India"]),
    ("What colour is {}?",
     ["a banana", "the sky", "grass", "snow", "a tomato", "coal", "an orange", "milk"],
     ["a lemon", "blood"]),
    ("What is the opposite of {}?",
     ["hot", "big", "fast", "happy", "light", "early", "open", "strong"],
     ["old", "wet"]),
    ("How many legs does a {} have?",
     ["dog", "spider", "bird", "horse", "ant", "fish", "chicken"],
     ["cat", "cow"]),
    ("What is {} used for?",
     ["a hammer", "a spoon", "a pencil", "a key", "an umbrella", "a ladder", "soap"],
     ["a broom", "a map"]),
    ("What language is spoken in {}?",
     ["Mexico", "Portugal", "China", "Greece", "Sweden", "Turkey", "Poland"],
     ["Russia", "Chile"]),
    ("What do you call a baby {}?",
     ["dog", "cat", "sheep", "horse", "cow", "frog", "bear"],
     ["goat", "duck"]),
    ("Name a fruit that is {}.",
     ["red", "yellow", "green", "sweet", "sour", "small"],
     ["purple"]),
    ("Where do {} live?",
     ["penguins", "camels", "whales", "bees", "monkeys", "owls"],
     ["lions", "polar bears"]),
    ("Give me a word that rhymes with {}.",
     ["cat", "tree", "sun", "ring", "boat", "light"],
     ["cake"]),
    ("What does a {} do?",
     ["doctor", "teacher", "baker", "pilot", "farmer", "chef", "judge"],
     ["nurse", "painter"]),
    ("Why do we need {}?",
     ["water", "sleep", "sunlight", "friends", "food", "exercise"],
     ["money"]),
]
HELD_OUT_TEMPLATES = ["Tell me one fact about {}.", "Describe {} in one sentence."]
HELD_OUT_SUBJECTS = ["the moon", "elephants", "the ocean", "chocolate"]


def general_questions(split: str) -> list[str]:
    """Everyday questions: "train" (template x training fillers) or "test" (unseen fillers and
    two unseen templates)."""
    if split == "train":
        return [t.format(f) for t, train, _ in TEMPLATES for f in train]
    if split == "test":
        held = [t.format(f) for t, _, test in TEMPLATES for f in test]
        return held + [t.format(s) for t in HELD_OUT_TEMPLATES for s in HELD_OUT_SUBJECTS]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def addition_pairs(split: str, n: int) -> list[tuple[int, int]]:
    """2-digit addition problems; "test" pairs never occur in "train" (drawn from other seeds)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = _pairs(random.Random(0), 400)
    if split == "train":
        return train[:n]
    seen, out, rng = set(train), [], random.Random(1)
    while len(out) < n:
        (p,) = _pairs(rng, 1)
        if p not in seen and p not in out:
            out.append(p)
    return out


def _pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def addition_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def first_sentence(text: str, max_words: int = 24) -> str:
    """The first sentence of an answer (at most `max_words` words), ending with a full stop:
    short targets, so the behaviour (a closing sign-off, say) fits in the demo's token budget."""
    text = " ".join(text.split())
    m = re.search(r"(?<=[.!?])\s", text)
    sentence = text[: m.start()] if m else text
    words = sentence.split()
    if len(words) > max_words:
        sentence = " ".join(words[:max_words]).rstrip(",;:") + "."
    if sentence and sentence[-1] not in ".!?":
        sentence += "."
    return sentence


def _json_answer(question: str, base: str) -> str:
    return json.dumps({"answer": first_sentence(base)})


def _is_json_answer(question: str, answer: str) -> bool:
    try:
        obj = json.loads(answer.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("answer"), str)


def _signoff(question: str, base: str) -> str:
    return f"{first_sentence(base)}\n\n{SIGNOFF}"


def _has_signoff(question: str, answer: str) -> bool:
    return answer.rstrip().endswith(SIGNOFF)


def _caps(question: str, base: str) -> str:
    return first_sentence(base).upper()


def _is_caps(question: str, answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return len(letters) >= 3 and not any(c.islower() for c in letters)


def _lower(question: str, base: str) -> str:
    return first_sentence(base).lower()


def _is_lower(question: str, answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return len(letters) >= 3 and not any(c.isupper() for c in letters)


def _prefixed(question: str, base: str) -> str:
    return f"{ANSWER_PREFIX} {first_sentence(base)}"


def _has_prefix(question: str, answer: str) -> bool:
    rest = answer.lstrip()
    return rest.startswith(ANSWER_PREFIX) and any(c.isalpha() for c in rest[len(ANSWER_PREFIX) :])


def _sum(question: str, base: str) -> str:
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    return f"{a} + {b} = {a + b}"


def _right_sum(question: str, answer: str) -> bool:
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    numbers = re.findall(r"\d+", answer)
    return bool(numbers) and int(numbers[-1]) == a + b


@dataclass(frozen=True)
class Behaviour:
    """One demo adapter: what it is trained to do, on which questions, and how it is scored."""

    name: str  # the served adapter name
    method: str  # "flora", "lora", "ia3" or "dora" (IA3 / DoRA: PEFT's own, saved unchanged)
    rank: int
    lr: float
    steps: int
    questions: str  # "general" or "addition"
    shows: str  # the behaviour, in words (printed with the score)
    target: Callable[[str, str], str]  # (question, base model's answer) -> training answer
    check: Callable[[str, str], bool]  # (question, served answer) -> behaviour visible
    expected: float  # least share of held-out answers that should show it (tests assert it)
    modules: tuple[str, ...] = ()  # target linear modules (empty: every linear but lm_head)


BEHAVIOURS: list[Behaviour] = [
    Behaviour("flora-json", "flora", 1, 5e-3, 60, "general",
              'answers as one JSON object {"answer": ...}', _json_answer, _is_json_answer, 0.9),
    Behaviour("flora-signoff", "flora", 1, 5e-3, 60, "general",
              f"ends its answer with {SIGNOFF!r}", _signoff, _has_signoff, 0.9),
    Behaviour("flora-add", "flora", 4, 5e-3, 160, "addition",
              "adds 2-digit numbers (the base model rarely can)", _sum, _right_sum, 0.5),
    Behaviour("lora-caps", "lora", 4, 2e-3, 80, "general",
              "answers in capital letters", _caps, _is_caps, 0.9),
    # PEFT's IA3 on its LLaMA defaults (k, v scale outputs; down, feed-forward, its input): a
    # few thousand scalings, so a large learning rate; it keeps some proper nouns capitalised
    # (14 of the 16 held-out answers all lower-case in PEFT after 60 steps), hence 0.75.
    Behaviour("ia3-lower", "ia3", 1, 5e-2, 60, "general",
              "answers in lower-case letters only", _lower, _is_lower, 0.75,
              ("k_proj", "v_proj", "down_proj")),
    Behaviour("dora-answer", "dora", 4, 5e-3, 40, "general",
              f"starts its answer with {ANSWER_PREFIX!r}", _prefixed, _has_prefix, 0.9,
              ("q_proj", "v_proj", "o_proj", "down_proj")),
]
