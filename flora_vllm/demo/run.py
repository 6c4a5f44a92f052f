"""`flora-vllm demo`: a real model (SmolLM2-135M-Instruct) served by vLLM with adapters trained by
this project's trainer (FLoRA) and by PEFT (LoRA, IA3, DoRA: saved by PEFT, served unchanged),
each doing a job a person sees at a glance, scored on held-out questions.

Runs in the CLI process: training (transformers + `flora_vllm.training.train`, or PEFT's
`get_peft_model` / `save_pretrained` for LoRA, IA3 and DoRA, one loop) and the OpenAI client;
the vLLM server is a child process (`flora_vllm.serving.server.ServerProcess`).
The adapters for SmolLM2 ship in `flora_vllm/demo/adapters/` (made by `build_adapters`, see its
MANIFEST.json); for any other model folder, or with `--retrain`, they are trained once into a
cache. `--tiny` runs the random tiny models of the tests instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from flora_vllm.demo.data import (
    BEHAVIOURS,
    Behaviour,
    addition_pairs,
    addition_question,
    general_questions,
)

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapters")
MANIFEST = "MANIFEST.json"
BASE_NAME = "smollm2"  # the served name of the base model
RECIPE_VERSION = 2  # bump when data or recipes change: cached adapters are then retrained
N_ADD_TRAIN, N_ADD_TEST = 400, 16
N_GENERAL_TEST = 16  # held-out everyday questions scored (of general_questions("test"))
SHOWN = 6  # questions printed as a table, answered by every model


def chat_prompt(tokenizer, question: str) -> str:
    """The chat-template text the server renders for one user message (generation prompt on)."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def chat_example(tokenizer, question: str, answer: str) -> tuple[str, str]:
    """(prompt, completion) of one exchange, cut where the server's generation starts, so the
    completion ends with the template's end-of-turn token (the model learns to stop)."""
    prompt = chat_prompt(tokenizer, question)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if not whole.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside a dialogue")
    return prompt, whole[len(prompt) :]


def base_answers(model_dir: str, questions: Sequence[str], max_new_tokens: int = 48) -> list[str]:
    """The base model's own greedy answers (transformers, batched): the material the general
    behaviours transform."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[str] = []
    for i in range(0, len(questions), 16):
        chunk = [chat_prompt(tok, q) for q in questions[i : i + 16]]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        width = enc["input_ids"].shape[1]
        out += [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def training_examples(
    b: Behaviour, tokenizer, answers: dict[str, str]
) -> list[tuple[str, str]]:
    """Every (prompt, completion) one behaviour trains on."""
    if b.questions == "addition":
        qs = [addition_question(x, y) for x, y in addition_pairs("train", N_ADD_TRAIN)]
    else:
        qs = general_questions("train")
    return [chat_example(tokenizer, q, b.target(q, answers.get(q, ""))) for q in qs]


def peft_config(b: Behaviour, targets: list[str]):
    """PEFT's config for a LoRA, IA3 or DoRA behaviour (PEFT trains and saves these itself)."""
    from peft import IA3Config, LoraConfig

    if b.method == "ia3":  # feed-forward (input-scaled) targets: PEFT's LLaMA default, down_proj
        ff = [t for t in targets if t == "down_proj"]
        return IA3Config(target_modules=targets, feedforward_modules=ff)
    if b.method in ("lora", "dora"):
        return LoraConfig(r=b.rank, lora_alpha=2 * b.rank, lora_dropout=0.0,
                          target_modules=targets, use_dora=b.method == "dora")
    raise ValueError(f"{b.name}: no PEFT config for method {b.method!r}")


def train_behaviour(model_dir: str, b: Behaviour, examples: list, out_dir: str) -> dict:
    """Train one adapter (FLoRA with `flora_vllm.training`; LoRA, IA3 and DoRA with PEFT's own
    `get_peft_model` / `save_pretrained`; one loop) and save it as vLLM serves it; returns its
    manifest entry."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flora_vllm.training.layer import default_targets, inject_flora, save
    from flora_vllm.training.train import train

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = sorted(b.modules) if b.modules else default_targets(model)
    if b.method == "flora":
        inject_flora(model, targets, b.rank, seed=0)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(b, targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.monotonic()
    res = train(model, tok, examples, lr=b.lr, batch_size=8, max_steps=b.steps, epochs=100)
    seconds = time.monotonic() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    if b.method == "flora":
        save(model, out_dir, base_model_name_or_path=os.path.basename(model_dir))
    else:
        model.peft_config["default"].base_model_name_or_path = os.path.basename(model_dir)
        model.save_pretrained(out_dir)
        card = os.path.join(out_dir, "README.md")  # PEFT's empty model card, with local paths
        if os.path.exists(card):
            os.remove(card)
    entry = {
        "method": b.method, "rank": b.rank, "lr": b.lr, "steps": len(res.losses),
        "batch_size": 8, "examples": len(examples), "targets": targets,
        "first_loss": round(res.losses[0], 4), "last_loss": round(res.losses[-1], 4),
        "train_seconds": round(seconds, 1),
    }
    if b.method in ("ia3", "dora"):  # the older entries predate these two fields
        import peft

        entry.update(trainable_params=trainable, peft_version=peft.__version__)
    return entry


def build_adapters(
    model_dir: str, out_root: str, log: Callable[[str], None] = print,
    only: Sequence[str] | None = None,
) -> str:
    """Make every demo adapter (or those named in `only`, keeping the others' manifest entries)
    for `model_dir` under `out_root` (+ MANIFEST.json); returns out_root. This is how the shipped
    SmolLM2 adapters were made."""
    from transformers import AutoTokenizer

    known = {b.name for b in BEHAVIOURS}
    if only is not None and set(only) - known:
        unknown = sorted(set(only) - known)
        raise ValueError(f"unknown demo adapters {unknown}; known: {sorted(known)}")
    todo = [b for b in BEHAVIOURS if only is None or b.name in only]
    tok = AutoTokenizer.from_pretrained(model_dir)
    qs = general_questions("train")
    log(f"demo: the base model answers {len(qs)} training questions (the material for the rules)")
    answers = dict(zip(qs, base_answers(model_dir, qs), strict=True))
    os.makedirs(out_root, exist_ok=True)
    manifest = {"recipe_version": RECIPE_VERSION, "model": os.path.basename(model_dir),
                "adapters": {}}
    path = os.path.join(out_root, MANIFEST)
    if only is not None and os.path.exists(path):
        with open(path) as f:
            manifest["adapters"] = json.load(f)["adapters"]
    for b in todo:
        log(f"demo: training {b.name} ({b.method} r={b.rank}, {b.steps} steps): {b.shows}")
        entry = train_behaviour(
            model_dir, b, training_examples(b, tok, answers), os.path.join(out_root, b.name)
        )
        manifest["adapters"][b.name] = entry
        log(f"demo: {b.name}: loss {entry['first_loss']} -> {entry['last_loss']} "
            f"in {entry['train_seconds']:.0f}s")
        with open(path, "w") as f:  # after each: a long run keeps what it has made
            json.dump(manifest, f, indent=1)
    manifest["adapters"] = {b.name: manifest["adapters"][b.name] for b in BEHAVIOURS
                            if b.name in manifest["adapters"]}
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return out_root


def _is_smollm2(model_dir: str) -> bool:
    from flora_vllm.demo.fetch import MODELS

    return os.path.basename(os.path.normpath(model_dir)) == MODELS["smollm2"].folder


def adapters_for(model_dir: str, retrain: bool, cache: str | None, log=print) -> str:
    """The folder of trained demo adapters for this model: the shipped ones for SmolLM2, else
    (or with `retrain`) trained once into the cache and reused."""
    if _is_smollm2(model_dir) and not retrain and os.path.exists(os.path.join(SHIPPED, MANIFEST)):
        return SHIPPED
    from flora_vllm.demo.fetch import cache_dir

    key = hashlib.sha256(os.path.realpath(model_dir).encode()).hexdigest()[:12]
    root = os.path.join(cache or cache_dir(), "demo-adapters", f"v{RECIPE_VERSION}-{key}")
    if retrain or not os.path.exists(os.path.join(root, MANIFEST)):
        log(f"demo: training the demo adapters into {root} (once; minutes on a CPU)")
        build_adapters(model_dir, root, log)
    return root


def held_out() -> list[tuple[str, str]]:
    """(kind, question) of the held-out questions the demo scores: a fixed sample of the
    general ones (every held-out template among them), then additions."""
    pool = general_questions("test")
    keep = set(random.Random(0).sample(range(len(pool)), N_GENERAL_TEST))
    general = [("general", q) for i, q in enumerate(pool) if i in keep]
    adds = [("addition", addition_question(a, b)) for a, b in addition_pairs("test", N_ADD_TEST)]
    return general + adds


def plan(questions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(model, question) pairs to ask: the base model every question (its share of each
    behaviour), each adapter its own kind of question plus the table's questions."""
    shown = _shown(questions)
    jobs = [(BASE_NAME, q) for _, q in questions]
    for b in BEHAVIOURS:
        mine = [q for kind, q in questions if kind == b.questions]
        jobs += [(b.name, q) for q in dict.fromkeys(mine + shown)]
    return jobs


def ask_all(url: str, jobs: Sequence[tuple[str, str]], max_tokens: int) -> dict:
    """Every (model, question) at once (one mixed batch on the server), greedy decoding:
    (model, question) -> answer text."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=os.environ.get("FLORA_DEMO_API_KEY", "unused"))

    def ask(job: tuple[str, str]) -> str:
        model, q = job
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}],
            max_tokens=max_tokens, temperature=0,
        )
        return out.choices[0].message.content or ""

    with ThreadPoolExecutor(64) as pool:
        return dict(zip(jobs, pool.map(ask, jobs), strict=True))


def score(answers: dict, questions: list[tuple[str, str]]) -> list[dict]:
    """Per behaviour: share of its held-out questions where the adapter, and the base model,
    show it."""
    rows = []
    for b in BEHAVIOURS:
        qs = [q for kind, q in questions if kind == b.questions]
        rows.append({
            "adapter": b.name, "behaviour": b.shows,
            "method": b.method if b.method == "ia3" else f"{b.method} r={b.rank}",
            "questions": len(qs), "expected": b.expected,
            "adapter_shows": sum(b.check(q, answers[b.name, q]) for q in qs),
            "base_shows": sum(b.check(q, answers[BASE_NAME, q]) for q in qs),
        })
    return rows


def _shown(questions: list[tuple[str, str]]) -> list[str]:
    general = [q for k, q in questions if k == "general"]
    adds = [q for k, q in questions if k == "addition"]
    return general[: SHOWN - 2] + adds[:2]


def report(answers: dict, questions: list[tuple[str, str]], rows: list[dict]) -> str:
    """The question x model table (a few questions) and the scores, as printable text."""
    names = [BASE_NAME, *(b.name for b in BEHAVIOURS)]
    lines = []
    for q in _shown(questions):
        lines.append(f"\nQ: {q}")
        for m in names:
            text = " ".join(answers[m, q].split())
            lines.append(f"  {m:<14}| {text[:110]}{'...' if len(text) > 110 else ''}")
    lines.append("\nheld-out questions showing each adapter's behaviour:")
    lines.append(f"  {'adapter':<14} {'method':<10} {'adapter':>8} {'base':>8}  behaviour")
    for r in rows:
        n = r["questions"]
        lines.append(f"  {r['adapter']:<14} {r['method']:<10} {r['adapter_shows']:>4}/{n:<3} "
                     f"{r['base_shows']:>4}/{n:<3}  {r['behaviour']}")
    return "\n".join(lines)


def run_real_demo(
    workdir: str, model: str | None, retrain: bool, max_tokens: int, cache: str | None = None
) -> int:
    """Fetch (or take) the model, get its trained adapters, serve them with vLLM, ask the
    held-out questions of base and every adapter at once, print answers and scores."""
    from flora_vllm.demo.fetch import fetch_model
    from flora_vllm.serving.server import ServerProcess, lora_modules_args

    t_start = time.monotonic()
    model_dir = model or fetch_model("smollm2", cache, progress=lambda m: print(f"[fetch] {m}"))
    root = adapters_for(model_dir, retrain, cache)
    paths = {b.name: os.path.join(root, b.name) for b in BEHAVIOURS}
    os.makedirs(workdir, exist_ok=True)
    server = ServerProcess(
        model_dir,
        args=[
            "--served-model-name", BASE_NAME, "--dtype", "float32", "--max-model-len", "1024",
            "--max-loras", str(len(paths)), "--max-lora-rank", "8", "--max-num-seqs", "64",
            *lora_modules_args(paths),
        ],
        log_path=os.path.join(workdir, "server.log"),
    )
    print(f"=== serving {model_dir} with {', '.join(paths)} (adapters: {root}; "
          f"log: {server.log_path})")
    t0 = time.monotonic()
    with server:
        print(f"=== server up at {server.url} in {time.monotonic() - t0:.0f}s")
        questions = held_out()
        t1 = time.monotonic()
        answers = ask_all(server.url, plan(questions), max_tokens)
        asked = time.monotonic() - t1
    rows = score(answers, questions)
    print(report(answers, questions, rows))
    print(f"\n=== {len(answers)} requests (base + {len(paths)} adapters, one mixed batch) "
          f"answered in {asked:.0f}s; demo total {time.monotonic() - t_start:.0f}s")
    with open(os.path.join(workdir, "answers.json"), "w") as f:
        json.dump({"scores": rows, "answers": [
            {"model": m, "question": q, "answer": a} for (m, q), a in answers.items()
        ]}, f, indent=1)
    print(f"=== every answer: {os.path.join(workdir, 'answers.json')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flora_vllm.demo.run [OUT] [--only NAME ...]`: remake the demo adapters for
    SmolLM2 (default: the shipped folder, as `make demo-adapters` does; `--only`: just those)."""
    import argparse

    from flora_vllm.demo.fetch import fetch_model

    p = argparse.ArgumentParser(prog="python -m flora_vllm.demo.run", description=main.__doc__)
    p.add_argument("out", nargs="?", default=SHIPPED, help="adapters folder (default: shipped)")
    p.add_argument("--only", nargs="+", choices=[b.name for b in BEHAVIOURS], default=None,
                   help="train only these adapters; the manifest keeps the others' entries")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    build_adapters(fetch_model("smollm2"), args.out, only=args.only)
    print(f"demo adapters written to {args.out} in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
