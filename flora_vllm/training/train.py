"""Train FLoRA adapters on a frozen transformers causal LM (pure torch + transformers, no vLLM).

FLoRA adapts a frozen linear weight W0 multiplicatively: W' = W0 ∘ (s · B @ A), s = alpha / r,
A [r, in], B [out, r]. `TrainableFLoRALinear` wraps an `nn.Linear` and holds `n_adapters` such
pairs, stacked, and runs in one of two forms, both differentiable, both computed by the serving
math of `flora_vllm.ops.torch_ops` (`dense_flora_weight`, `flora_linear`):

- one adapter for the whole batch (`adapter_ids` unset): the merged weight W0 ∘ (s · B A) and
  one ordinary matmul, the cheapest way to train a single adapter;
- one adapter per example (`adapter_ids` [N] set, -1 = base): the batched form of the paper,
  y_i = Σ_k s · B_i[:, k] ∘ (W0 (A_i[k] ∘ x_i)) + bias, so one minibatch trains many adapters
  with one shared base matmul of r rows per token (what the server computes at inference).

Identity start: A = 1, B = 1 / alpha gives s · B A = 1, i.e. exactly the base model. For r > 1
identical components would get identical gradients and never separate, so the rows of A are
perturbed in pairs 1 + ε, 1 − ε (ε dyadic): Σ_k A[k] is still exactly r and the start is still
exactly the base model in the merged form, but the components can diverge.

`save` writes the FLoRA adapter folder of `flora_vllm.adapter` (the server's input format).
Weight decay defaults to 0: AdamW decays towards 0, and a factor of 0 deletes the weight
rather than leaving it unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from flora_vllm.adapter import save_adapter
from flora_vllm.ops import torch_ops

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_LR = 5e-3  # the FLoRA paper's learning rate
DEFAULT_INIT_SPREAD = 0.02  # std of the paired perturbation of A's rows when r > 1


class TrainableFLoRALinear(nn.Module):
    """A frozen `nn.Linear` with `n_adapters` stacked FLoRA factor pairs (the training layer;
    not the serving `flora_vllm.layers.FLoRALinearMixin`).

    Attributes:
        base: the wrapped linear layer (its parameters are frozen).
        flora_A: [n_adapters, r, in] input scalings.
        flora_B: [n_adapters, out, r] output scalings (unscaled; `scale` = alpha / r applied).
            This is the file/training layout, B [out, r] as in the adapter folder; the serving
            stacks of `torch_ops.flora_linear` are b_stacked [S, R, out] (B^T, scale folded in),
            which `forward_batched` builds as (scale · flora_B).transpose(1, 2).
        adapter_ids: None (every example uses `active_adapter`, merged form) or a [N] int tensor,
            one adapter per example of the next batches, -1 for the base weight (batched form).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 1,
        n_adapters: int = 1,
        alpha: float = 1.0,
        init_spread: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"FLoRA rank `r` must be a positive integer, got {r!r}")
        if n_adapters < 1:
            raise ValueError(f"`n_adapters` must be positive, got {n_adapters}")
        if not math.isfinite(alpha) or alpha == 0:
            raise ValueError(f"`alpha` must be a finite non-zero number, got {alpha}")
        self.base = base
        base.requires_grad_(False)
        self.r, self.n_adapters, self.alpha = r, n_adapters, float(alpha)
        w = base.weight
        self.flora_A = nn.Parameter(torch.empty(n_adapters, r, base.in_features, dtype=w.dtype))
        self.flora_B = nn.Parameter(torch.empty(n_adapters, base.out_features, r, dtype=w.dtype))
        self.adapter_ids: torch.Tensor | None = None
        self.active_adapter = 0
        self.reset_parameters(init_spread, generator)
        self.to(w.device)

    @property
    def scale(self) -> float:
        """alpha / r, the factor applied to B A (as in the adapter folder's config)."""
        return self.alpha / self.r

    @torch.no_grad()
    def reset_parameters(
        self, init_spread: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Identity start: B = 1 / alpha, A = 1 with rows perturbed in ± pairs (r > 1 only)."""
        spread = (
            (DEFAULT_INIT_SPREAD if self.r > 1 else 0.0) if init_spread is None else init_spread
        )
        n, r, d_in = self.flora_A.shape
        a = torch.ones(n, r, d_in, dtype=torch.float64)
        if spread > 0 and r > 1:
            eps = spread * torch.randn(n, r // 2, d_in, generator=generator, dtype=torch.float64)
            eps = torch.round(eps * 2**12) / 2**12  # dyadic: 1 ± ε and their sum are exact
            a[:, 0 : 2 * (r // 2) : 2] += eps
            a[:, 1 : 2 * (r // 2) : 2] -= eps
        self.flora_A.copy_(a)
        self.flora_B.fill_(1.0 / self.alpha)

    def merged_weight(self, adapter: int = 0) -> torch.Tensor:
        """W0 ∘ (scale · B A) of one adapter, [out, in] (differentiable)."""
        return torch_ops.dense_flora_weight(
            self.base.weight, self.flora_A[adapter], self.scale * self.flora_B[adapter]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out]: merged form, or per-example form when adapter_ids is set."""
        if self.adapter_ids is None:
            return F.linear(x, self.merged_weight(self.active_adapter), self.base.bias)
        return self.forward_batched(x, self.adapter_ids)

    def forward_batched(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """Per-example FLoRA: y_i = Σ_k s · B_i[:, k] ∘ (W0 (A_i[k] ∘ x_i)) + bias.

        Args:
            x: [N, ..., in], example i served by adapter adapter_ids[i].
            adapter_ids: [N] int, -1 for the base weight.
        Returns:
            [N, ..., out].
        """
        n = x.shape[0]
        if adapter_ids.shape != (n,):
            raise ValueError(
                f"adapter_ids has shape {list(adapter_ids.shape)}, expected [{n}] "
                "(one adapter per example of the batch)"
            )
        ids = adapter_ids.to(device=x.device, dtype=torch.long)
        per_example = x[0].numel() // x.shape[-1] if n else 0  # positions per example
        token_slots = ids.repeat_interleave(per_example)  # [T], -1 = base
        slot_ranks = torch.full((self.n_adapters,), self.r, dtype=torch.long, device=x.device)
        y = torch_ops.flora_linear(
            x.reshape(-1, x.shape[-1]),  # [T, in]
            self.base.weight,
            self.base.bias,
            token_slots,
            self.flora_A,  # [n, r, in]
            (self.scale * self.flora_B).transpose(1, 2),  # [n, r, out], the serving layout
            slot_ranks,
        )  # [T, out]: one shared matmul of r rows per adapted token, one per base token
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def factors(self, adapter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of one adapter, unscaled, as written to the adapter folder."""
        return self.flora_A[adapter].detach().clone(), self.flora_B[adapter].detach().clone()

    def extra_repr(self) -> str:
        return f"r={self.r}, n_adapters={self.n_adapters}, alpha={self.alpha}"


def default_targets(model: nn.Module) -> list[str]:
    """Short names of every nn.Linear of the model except the output embedding (lm_head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out_emb
        }
    )


def inject_flora(
    model: nn.Module,
    targets: Sequence[str],
    r: int = 1,
    n_adapters: int = 1,
    alpha: float = 1.0,
    init_spread: float | None = None,
    seed: int = 0,
) -> dict[str, TrainableFLoRALinear]:
    """Freeze the model and replace each nn.Linear whose short name is in `targets` by a
    TrainableFLoRALinear at identity; returns module path -> layer (the paths the adapter
    folder uses).

    Raises:
        ValueError naming the targets that match no nn.Linear of the model.
    """
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    paths = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    missing = sorted(set(targets) - {p.rsplit(".", 1)[-1] for p in paths})
    if missing:
        raise ValueError(
            f"targets {missing} match no nn.Linear of {type(model).__name__} "
            f"(linear modules: {default_targets(model)})"
        )
    layers = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = TrainableFLoRALinear(getattr(parent, child), r, n_adapters, alpha, init_spread, gen)
        setattr(parent, child, layer)
        layers[path] = layer
    return layers


def flora_layers(model: nn.Module) -> dict[str, TrainableFLoRALinear]:
    """Module path -> TrainableFLoRALinear of every injected layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TrainableFLoRALinear)}


def set_active_adapter(model: nn.Module, adapter: int) -> None:
    """Make every FLoRA layer use `adapter` for whole batches (the merged form)."""
    for layer in flora_layers(model).values():
        layer.active_adapter = adapter
        layer.adapter_ids = None


@contextmanager
def per_example_adapters(model: nn.Module, adapter_ids: torch.Tensor) -> Iterator[None]:
    """Within the block, example i of a batch uses adapter adapter_ids[i] (-1: base model)."""
    layers = flora_layers(model).values()
    for layer in layers:
        layer.adapter_ids = adapter_ids
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_ids = None


def save(
    model: nn.Module, out_dir: str, adapter: int = 0, base_model_name_or_path: str = ""
) -> str:
    """Write one adapter of the model's FLoRA layers as a FLoRA adapter folder; returns out_dir."""
    layers = flora_layers(model)
    if not layers:
        raise ValueError("the model has no FLoRA layers: call inject_flora first")
    specs = {(layer.r, layer.alpha) for layer in layers.values()}
    if len(specs) != 1:
        raise ValueError(
            f"FLoRA layers disagree on (r, alpha): {sorted(specs)}; the folder has one"
        )
    ((r, alpha),) = specs
    factors = {path: layer.factors(adapter) for path, layer in layers.items()}
    save_adapter(out_dir, factors, r, alpha, base_model_name_or_path)
    return out_dir


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
