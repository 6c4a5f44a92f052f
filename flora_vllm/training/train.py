"""Train FLoRA adapters on a frozen transformers causal LM: data, loss, the loop and the
`flora-vllm train` command (pure torch + transformers, no vLLM). The layer and its injection
into a model are in `layer.py`; `save` writes the server's adapter folder.

Runs in: the training process (`flora-vllm train`, the demo, the accuracy benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from flora_vllm.training.layer import (
    DEFAULT_LR,
    default_targets,
    flora_layers,
    inject_flora,
    per_example_adapters,
    save,
)

Example = str | tuple[str, str]  # a text (loss on every token) or (prompt, completion)


def load_texts(path: str) -> list[Example]:
    """Training examples: per .jsonl line a "text", or a "prompt" + "completion" (loss on the
    completion only); in any other file one non-empty line per example."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if not path.endswith(".jsonl"):
        texts: list[Example] = [line for line in lines if line.strip()]
        if not texts:
            raise ValueError(f"{path} holds no training examples")
        return texts
    texts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str)
        ):
            texts.append((row["prompt"], row["completion"]))
        else:
            raise ValueError(
                f'{path}:{i}: expected a JSON object with a string "text", or strings '
                '"prompt" and "completion"'
            )
    if not texts:
        raise ValueError(f"{path} holds no training examples")
    return texts


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[Example], max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, and labels with padding (and the prompt of a
    (prompt, completion) example) set to -100.

    A pair is tokenized as prompt + completion in one text, without added special tokens (a
    chat-template prompt carries its own), so the tokens are those the server sees."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    pairs = [t for t in texts if isinstance(t, tuple)]
    if pairs and len(pairs) != len(texts):
        raise ValueError("a batch mixes plain texts and (prompt, completion) pairs")
    whole = [t[0] + t[1] if isinstance(t, tuple) else t for t in texts]
    enc = tokenizer(
        whole,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        **({"add_special_tokens": False} if pairs else {}),
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, (prompt, _) in enumerate(pairs):
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        labels[i, :n] = -100
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], adapter_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, one adapter per example if `adapter_ids`."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if adapter_ids is None:
        return model(**batch).loss
    with per_example_adapters(model, adapter_ids.to(device)):
        return model(**batch).loss


@dataclass
class TrainResult:
    """Loss of every optimizer step, in order."""

    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[Example],
    adapter_ids: Sequence[int] | None = None,
    lr: float = DEFAULT_LR,
    epochs: int = 1,
    batch_size: int = 8,
    max_length: int = 256,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train the model's trainable parameters (its adapter) with AdamW on the causal LM loss.

    Args:
        model: a frozen causal LM with an adapter: FLoRA layers (`inject_flora`) or a PEFT
            model (`get_peft_model`); only parameters with requires_grad are trained.
        tokenizer: its tokenizer (eos is used as padding if it has no pad token).
        texts: the training examples: texts, or (prompt, completion) pairs.
        adapter_ids: the adapter of each text (mixed minibatches, per-example form); None
            trains each layer's active adapter on every text (merged form).
        max_steps: stop after this many optimizer steps (None: run every epoch).
    """
    from tqdm.auto import tqdm

    if adapter_ids is not None and len(adapter_ids) != len(texts):
        raise ValueError(f"{len(adapter_ids)} adapter ids for {len(texts)} texts")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not (flora_layers(model) or hasattr(model, "peft_config")):
        raise ValueError(
            "the model has no adapter to train: call inject_flora (or PEFT's get_peft_model) "
            "first; training would otherwise change the base weights"
        )
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(texts) / batch_size)
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    result = TrainResult()
    model.train()
    with tqdm(total=total, desc="adapter training", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(texts), generator=gen).tolist()
            for start in range(0, len(order), batch_size):
                if len(result.losses) >= total:
                    break
                idx = order[start : start + batch_size]
                batch = encode(tokenizer, [texts[i] for i in idx], max_length)
                ids = None if adapter_ids is None else torch.tensor([adapter_ids[i] for i in idx])
                loss = lm_loss(model, batch, ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                result.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
    model.eval()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`flora-vllm train BASE DATA --output DIR ...`: train one FLoRA adapter and save it."""
    p = argparse.ArgumentParser(
        prog="flora-vllm train",
        description="Train a FLoRA adapter (base model frozen) and save it as a FLoRA folder.",
    )
    p.add_argument("base_model", help="transformers causal LM folder (or hub name)")
    p.add_argument("data", help='.txt (one example per line) or .jsonl (a "text" field per line)')
    p.add_argument("--output", "-o", required=True, help="adapter folder to write")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--alpha", type=float, default=1.0, help="scale = alpha / rank")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="linear module names, e.g. q_proj v_proj (default: every linear but lm_head)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    texts = load_texts(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
    model.to(args.device)
    targets = [t for arg in args.targets for t in arg.split(",") if t] if args.targets else None
    targets = targets or default_targets(model)
    layers = inject_flora(model, targets, args.rank, alpha=args.alpha, seed=args.seed)
    n_params = sum(
        p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad
    )
    print(
        f"FLoRA r={args.rank} on {len(layers)} modules ({', '.join(targets)}): "
        f"{n_params} trainable parameters, {len(texts)} examples"
    )
    res = train(
        model,
        tokenizer,
        texts,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.max_steps,
        seed=args.seed,
    )
    save(model, args.output, base_model_name_or_path=args.base_model)
    if res.losses:
        print(
            f"loss: first step {res.losses[0]:.4f}, last step {res.losses[-1]:.4f} "
            f"({len(res.losses)} steps)"
        )
    print(f"saved FLoRA adapter to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
