"""Layers whose forward pass plans on the host, as single opaque nodes for torch.compile.

vLLM's CPU platform turns compilation off whenever LoRA is enabled, because LoRA layers branch
on per-step host state (which slots the step's tokens use, prefill or decode). A trace-once
compile would bake the traced step's branch into every later step. Here each such layer is one
`flora::eager_layer` node instead: the graph calls it with the activations, and its body runs the
layer's ordinary eager code at run time, so the rest of the model (norms, rotary, activations,
attention glue) is compiled while the adapter layers keep their per-step dispatch. Pure torch.

Runs in: the worker (registration at layer creation, calls in every forward pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LayerFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
FakeFn = Callable[[torch.Tensor], torch.Tensor]

# key -> (the layer's eager forward, its output's empty stand-in). Keys are baked into compiled
# graphs, which vLLM caches on disk across processes and versions of this package: they are the
# layers' module names, stable wherever the model is the same, never registration counters.
_LAYERS: dict[str, tuple[LayerFn, FakeFn]] = {}


def register(key: str, fn: LayerFn, fake: FakeFn) -> str:
    """Make `eager_layer(x, bias, key)` call `fn(x, bias)`; `fake(x)` gives an empty tensor of
    the output's shape and dtype for tracing. A key registered again (the model rebuilt in
    this process) now means the new layer."""
    _LAYERS[key] = (fn, fake)
    return key


def linear_fake(out_features: int) -> FakeFn:
    """Fake of a linear layer: [..., in] -> [..., out] in x's dtype."""
    return lambda x: x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("flora::eager_layer", mutates_args=())
def eager_layer(x: torch.Tensor, bias: torch.Tensor | None, key: str) -> torch.Tensor:
    """Run registered layer `key` eagerly on x: [..., in] -> [..., out] (a fresh tensor)."""
    return _LAYERS[key][0](x, bias)


@eager_layer.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, key: str) -> torch.Tensor:
    return _LAYERS[key][1](x)


def call(key: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The opaque node for layer `key` (use while torch.compile traces)."""
    return torch.ops.flora.eager_layer(x, bias, key)
