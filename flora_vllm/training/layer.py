"""The trainable FLoRA layer and its surgery on a transformers model (pure torch, no vLLM).

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

Runs in: the training process (`flora-vllm train`, the demo, the accuracy benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from flora_vllm.adapter import save_adapter
from flora_vllm.ops import torch_ops

if TYPE_CHECKING:
    pass

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
