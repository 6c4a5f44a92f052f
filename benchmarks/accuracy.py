"""Accuracy of FLoRA against LoRA and IA3 on synthetic tasks, with the base model frozen.

A tiny LLaMA (`flora_vllm.tiny.build_llama`) is first pre-trained in full on "generic" skills
(follow permutation P0, copy a segment), then frozen; each method then trains only its adapter
on each new task and is scored on held-out sequences (loss and next-token accuracy on the
supervised positions only):

- `chain`:    x, f1(x), f1(f1(x)), ...         (a new permutation: new knowledge)
- `copy-map`: x1..xn SEP f2(x1)..f2(xn)        (copying, seen in pre-training, plus a new map)
- `reverse`:  x1..xn SEP xn..x1                (a new use of attention)

Methods: FLoRA r=1 and r=4 (`flora_vllm.train`, merged form), LoRA r=1 and r=4 and IA3 (PEFT),
each with AdamW at the same learning rate(s); the full run picks each method's learning rate on
a validation split. This is a small, synthetic check that FLoRA trains as well as the usual
adapters at equal rank on one tiny random model, not a reproduction of the paper's results.

    python benchmarks/accuracy.py --quick           # a few minutes on one CPU core
    python benchmarks/accuracy.py                   # the long configuration (4 lrs, 3 seeds)

Writes `accuracy-<stamp>.json` and `.md` (held-out loss / accuracy per task and method).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a plain script from a repo checkout

from flora_vllm.tiny import LLAMA_TARGETS, TinySpec, build_llama  # noqa: E402
from flora_vllm.train import flora_layers, inject_flora  # noqa: E402

N_SYMBOLS = 48  # task alphabet: token ids FIRST .. FIRST + N_SYMBOLS - 1
FIRST = 2
SEP = FIRST + N_SYMBOLS  # separator token
TASKS = ("chain", "copy-map", "reverse")
METHODS = ("flora-r1", "flora-r4", "lora-r1", "lora-r4", "ia3")


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


# The multiplicative methods (FLoRA, IA3) want larger learning rates than LoRA here (at 5e-3
# they are still far from converged after 150 steps), so even the quick run picks each method's
# learning rate from two, on the validation split.
QUICK = Config(
    n_train=1024, n_test=256, pretrain_steps=300, steps=150, lrs=(5e-3, 5e-2), hidden=128
)
FULL = Config(pretrain_steps=2000, steps=1500, lrs=(1e-3, 5e-3, 2e-2, 5e-2), seeds=(0, 1, 2))


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

    if kind == "lora":  # lora_alpha = 2r: the same scale 2 at every rank
        peft_cfg = LoraConfig(
            r=int(rank),
            lora_alpha=2 * int(rank),
            lora_dropout=0.0,
            target_modules=list(LLAMA_TARGETS),
        )
    elif kind == "ia3":  # PEFT's LLaMA default targets
        peft_cfg = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    model = get_peft_model(model, peft_cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def run(cfg: Config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Every (task, method): best-validation learning rate, then test loss/accuracy per seed."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(7)
    perms = {k: torch.randperm(N_SYMBOLS, generator=g) for k in ("chain-p0", "chain", "copy-map")}
    t0 = time.monotonic()
    base_dir = pretrain_base(workdir, cfg, perms)
    log(f"pre-trained the base in {time.monotonic() - t0:.0f}s")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = []
    for task in TASKS:
        gen = torch.Generator().manual_seed(100 + TASKS.index(task))
        train = make_task(task, cfg.n_train, cfg.seg_len, perms, gen)
        val = make_task(task, cfg.n_val, cfg.seg_len, perms, gen)
        test = make_task(task, cfg.n_test, cfg.seg_len, perms, gen)
        rows.append(
            {
                "task": task,
                "method": "base (no adapter)",
                "params": 0,
                "lr": None,
                **evaluate(base, *test),
                "seeds": 0,
            }
        )
        for method in METHODS:
            best = None
            for lr in cfg.lrs:
                scores = []
                for seed in cfg.seeds:
                    model, params = adapted_model(method, base_dir, seed)
                    fit(model, params, *train, lr, cfg.steps, cfg.batch, seed)
                    scores.append((evaluate(model, *val), evaluate(model, *test)))
                val_loss = sum(s[0]["loss"] for s in scores) / len(scores)
                if best is None or val_loss < best[0]:
                    best = (val_loss, lr, scores, sum(p.numel() for p in params))
            _, lr, scores, n_params = best
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
    return {"rows": rows, "seconds": time.monotonic() - t0}


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


def _versions() -> dict:
    """Library versions that shape the numbers."""
    out = {"python": platform.python_version(), "machine": platform.platform()}
    for dist in ("torch", "transformers", "peft", "flora-vllm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the quick or full configuration and write the JSON and markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="the few-minute CPU configuration")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and .md")
    p.add_argument("--workdir", default=None, help="where the tiny model goes (default: temp)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these tiny matmuls on a shared machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        result = run(cfg, args.workdir or tmp)
    result.update(config=asdict(cfg), mode="quick" if args.quick else "full", versions=_versions())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"accuracy-{dt.datetime.now():%Y%m%d-%H%M%S}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(
            f"# FLoRA vs LoRA vs IA3, base frozen ({result['mode']} run, "
            f"{result['seconds']:.0f}s)\n\nHeld-out loss / next-token accuracy on the "
            f"supervised positions; lr per method: {list(cfg.lrs)}, seeds {list(cfg.seeds)}."
            f"\n\n{table}\n"
        )
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
