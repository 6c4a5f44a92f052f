"""Layer-level checks of the `<Base>WithFLoRA` classes on real vLLM linear layers (issue #16).

What: every layer family (column, gate_up packed as one module, gate_up as two slices, qkv as one
module, q/k/v as three slices with GQA, row) is built from vLLM's own base layer, wrapped the way
vLLM's LoRA manager wraps it (`vllm.lora.utils.from_layer` with the plugin's classes first), and
runs mixed batches through vLLM's CPU punica wrapper: plain tokens (slot -1), FLoRA adapters of
rank 1 and higher, a FLoRA adapter that adapts only some slices of a packed layer, and an ordinary
LoRA adapter. Every token and every output slice is compared with a dense float64 reference
(FLoRA: x (W0 ∘ B A)^T, B carrying flora_alpha / r as the loader folds it; LoRA: x W0^T +
x A^T B^T). Slots are then emptied and refilled (FLoRA <-> LoRA, other ranks, another unadapted
slice), which must leave no stale state behind.
Tensor parallelism is simulated in one process: each rank of tp_size=2 is its own layer, built
with vLLM's TP rank/size lookups patched, its weight shard loaded by vLLM's own `weight_loader`,
and its adapters sliced by the layer itself (`slice_lora_a` / `slice_lora_b`), exactly as a
worker of that rank gets them. Column layers: each rank's output equals its rows of the
unsharded output (q/k/v heads split, or kv heads replicated when tp_size > kv heads); row
layers: the per-rank partial outputs sum to the unsharded output.

Why: the end-to-end tests see these layers only through a model's logits on one process; a
slicing or slot bookkeeping error in one family can hide there.

Fakes (all scoped to a test by monkeypatch): the TP rank/size lookups of
`vllm.model_executor.layers.linear` / `vllm.model_executor.parameter` (no process group at
all), the current vLLM config (one with a LoRA config, which the plugin's CPU GEMM hook reads), and
the plugin's own hooks that a server always has installed: the CPU GEMM dispatch keeping the
unpacked weight, the FLoRA classes in `_all_lora_classes`, the bgmv ops skipping slot -1 tokens.
The execution policy (`get_config`) is pinned per test, and `auto` gets a fixed toy cost model, so
which path runs never depends on this machine's calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch

from flora_vllm import layers
from flora_vllm.config import FLoRAConfig
from flora_vllm.hooks import worker_step
from flora_vllm.ops.merge_cache import MergedWeightCache
from flora_vllm.ops.policy import CostModel

pytestmark = pytest.mark.line  # also run on the other vLLM line (`make test-line`)

if TYPE_CHECKING:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

H = 64  # hidden size (input of column layers, output of the row layer)
HEAD = 16  # head size; 4 query heads -> q = 64 rows
Q_HEADS = 4
FFN = 48  # per half of gate_up; the row layer's input is 2 * FFN
MAX_LORAS = 4
MAX_RANK = 8
MAX_TOKENS = 64
ALPHA = 2.0  # flora_alpha: set_flora receives B · (alpha / r)

_ROWS = [2**k for k in range(11)]
# compute-bound toy machine (as in test_torch_ops): under `auto`, some segments merge, some not
_TOY_COST = CostModel(_ROWS, [float(m) for m in _ROWS], merge_base=1.0, merge_per_rank=1.0)


# --- the layer families --------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor of a base layer: its `weight_loader` shard id, its rows, and at most
    how many distinct shards tensor parallelism splits it into (kv heads: one per head, so with
    more ranks than kv heads each head is replicated); None = one per rank."""

    shard_id: int | str | None
    rows: int
    max_shards: int | None = None

    def tp_shards(self, tp: int) -> int:
        return tp if self.max_shards is None else min(tp, self.max_shards)


@dataclass(frozen=True)
class Family:
    name: str
    flora_cls: type
    packed: tuple[str, ...]  # packed_modules_list the model declares for this module
    parts: tuple[Part, ...]
    slices: tuple[int, ...]  # adapter slices (full, unsharded out sizes), tiling the output
    in_size: int
    row_parallel: bool = False

    def build(self, dtype: torch.dtype) -> torch.nn.Module:
        from vllm.model_executor.layers import linear

        kw = {"bias": True, "params_dtype": dtype, "prefix": f"test.{self.name}"}
        if self.row_parallel:
            return linear.RowParallelLinear(self.in_size, self.parts[0].rows, **kw)
        if self.parts[0].shard_id == "q":
            kv_heads = self.parts[1].rows // HEAD
            return linear.QKVParallelLinear(H, HEAD, Q_HEADS, kv_heads, **kw)
        if len(self.parts) == 2:
            return linear.MergedColumnParallelLinear(H, [p.rows for p in self.parts], **kw)
        return linear.ColumnParallelLinear(H, self.parts[0].rows, **kw)

    @property
    def out_size(self) -> int:
        return sum(p.rows for p in self.parts)


def _kv_parts(kv_heads: int) -> tuple[Part, ...]:
    kv = kv_heads * HEAD
    return (Part("q", Q_HEADS * HEAD), Part("k", kv, kv_heads), Part("v", kv, kv_heads))


def _families() -> list[Family]:
    from flora_vllm.layers import (
        ColumnParallelLinearWithFLoRA,
        MergedColumnParallelLinearWithFLoRA,
        MergedQKVParallelLinearWithFLoRA,
        QKVParallelLinearWithFLoRA,
        RowParallelLinearWithFLoRA,
    )

    gate_up = (Part(0, FFN), Part(1, FFN))
    out = [
        Family(
            "column",
            ColumnParallelLinearWithFLoRA,
            ("c_fc",),
            (Part(None, 2 * FFN),),
            (2 * FFN,),
            H,
        ),
        Family(
            "gate_up_as_one",
            ColumnParallelLinearWithFLoRA,
            ("gate_up_proj",),
            gate_up,
            (2 * FFN,),
            H,
        ),
        Family(
            "gate_up",
            MergedColumnParallelLinearWithFLoRA,
            ("gate_proj", "up_proj"),
            gate_up,
            (FFN, FFN),
            H,
        ),
    ]
    for kv_heads in (2, 1):  # tp_size 2: kv heads split / replicated
        parts = _kv_parts(kv_heads)
        sizes = tuple(p.rows for p in parts)
        out += [
            Family(
                f"qkv_as_one_kv{kv_heads}",
                QKVParallelLinearWithFLoRA,
                ("c_attn",),
                parts,
                (sum(sizes),),
                H,
            ),
            Family(
                f"qkv_kv{kv_heads}",
                MergedQKVParallelLinearWithFLoRA,
                ("q_proj", "k_proj", "v_proj"),
                parts,
                sizes,
                H,
            ),
        ]
    out.append(
        Family(
            "row",
            RowParallelLinearWithFLoRA,
            ("o_proj",),
            (Part(None, H),),
            (H,),
            2 * FFN,
            row_parallel=True,
        )
    )
    return out


FAMILIES = _families()
FAMILY_IDS = [f.name for f in FAMILIES]


# --- adapters and the dense reference ------------------------------------------------------------


@dataclass
class Adapter:
    """What the worker hands a layer for one slot: per adapter slice a [r, in], b [out, r]
    (scale folded into b, as both loaders do), None = slice not adapted."""

    kind: str  # "flora" | "lora" | "dora" (a LoRA and, per slice, an output scaling s)
    a: list[torch.Tensor | None]
    b: list[torch.Tensor | None]
    s: list[torch.Tensor | None] | None = None  # dora: [out] per slice (b's rows already × s)
    bias_scale: list[torch.Tensor | None] | None = None  # flora: [out] per slice scales the bias


def _ia3(fam: Family, gen: torch.Generator) -> Adapter:
    """IA3 on a non-feed-forward module: rank 1 with a = 1, b = l, and l scales the bias too."""
    ls = [1 + 0.3 * torch.randn(out, generator=gen) for out in fam.slices]
    a = [torch.ones(1, fam.in_size) for _ in fam.slices]
    return Adapter("flora", a, [l_i[:, None] for l_i in ls], bias_scale=ls)


def _flora(
    fam: Family, r: int, gen: torch.Generator, skip: int | None = None, scale_bias: bool = False
) -> Adapter:
    """scale_bias: the adapted slices scale the bias too (`set_flora`'s bias_scale)."""
    a: list[torch.Tensor | None] = []
    b: list[torch.Tensor | None] = []
    for i, out in enumerate(fam.slices):
        if i == skip:
            a.append(None)
            b.append(None)
            continue
        a.append(1 + 0.3 * torch.randn(r, fam.in_size, generator=gen))
        b.append((1 + 0.3 * torch.randn(out, r, generator=gen)) * (ALPHA / r))
    scales = None
    if scale_bias:
        scales = [None if b_i is None else 1 + 0.3 * torch.randn(b_i.shape[0], generator=gen)
                  for b_i in b]
    return Adapter("flora", a, b, bias_scale=scales)


def _lora(fam: Family, r: int, gen: torch.Generator) -> Adapter:
    a = [0.2 * torch.randn(r, fam.in_size, generator=gen) for _ in fam.slices]
    b = [0.2 * torch.randn(out, r, generator=gen) for out in fam.slices]
    return Adapter("lora", a, b)


def _dora(fam: Family, r: int, gen: torch.Generator) -> Adapter:
    lora = _lora(fam, r, gen)
    s = [1 + 0.3 * torch.randn(out, generator=gen) for out in fam.slices]
    b = [b_i * s_i[:, None] for b_i, s_i in zip(lora.b, s, strict=True)]
    return Adapter("dora", lora.a, b, s)


def dense_reference(
    fam: Family,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    slots: list[int],
    adapters: dict[int, Adapter],
) -> torch.Tensor:
    """The full (unsharded) output in float64, token by token, with each token's own dense
    weight per slice: built independently of flora_vllm's stacks and kernels."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    rows = []
    for t, s in enumerate(slots):
        ad = adapters.get(s)
        outs, start = [], 0
        for i, size in enumerate(fam.slices):
            w = weight[start : start + size]
            y = x[t] @ w.T + bias[start : start + size]
            if ad is not None and ad.a[i] is not None:
                a_i, b_i = ad.a[i].double(), ad.b[i].double()
                if ad.kind == "flora":
                    bias_i = bias[start : start + size]
                    if ad.bias_scale is not None and ad.bias_scale[i] is not None:
                        bias_i = bias_i * ad.bias_scale[i].double()
                    y = x[t] @ (w * (b_i @ a_i)).T + bias_i
                elif ad.kind == "dora":  # s ∘ (W0 x) + bias + B' A x, B' = s ∘ B
                    y = (x[t] @ w.T) * ad.s[i].double() + bias[start : start + size]
                    y = y + (x[t] @ a_i.T) @ b_i.T
                else:
                    y = y + (x[t] @ a_i.T) @ b_i.T
            outs.append(y)
            start += size
        rows.append(torch.cat(outs))
    return torch.stack(rows)


# --- building layers as a worker of one TP rank does ---------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """The served setting of the plugin, confined to this test; yields `policy(execution)`."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.lora import utils as lora_utils
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.model_executor.layers import utils as layer_utils

    gemm = layer_utils.dispatch_cpu_unquantized_gemm
    monkeypatch.setattr(
        layer_utils,
        "dispatch_cpu_unquantized_gemm",
        worker_step._wrap_cpu_gemm_dispatch(getattr(gemm, "__wrapped__", gemm)),
    )
    stock_classes = [c for c in lora_utils._all_lora_classes if c not in layers.FLORA_LAYER_CLASSES]
    monkeypatch.setattr(
        lora_utils, "_all_lora_classes", (*layers.FLORA_LAYER_CLASSES, *stock_classes)
    )
    for module in (lora_ops, punica_cpu):
        for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            fn = getattr(module, op)
            monkeypatch.setattr(
                module, op, worker_step._skip_unadapted_tokens(getattr(fn, "__wrapped__", fn))
            )
    monkeypatch.setattr(layers.base, "_merge_cache", MergedWeightCache(64 * 2**20))  # fresh
    monkeypatch.setattr(layers.base, "_cost_model", lambda w: _TOY_COST)

    def policy(execution: str) -> None:
        cfg = FLoRAConfig(execution=execution)
        monkeypatch.setattr(layers.base, "get_config", lambda: cfg)

    policy("auto")
    config = VllmConfig()
    config.lora_config = _lora_config()
    with set_current_vllm_config(config):
        yield policy


def _lora_config(dtype: torch.dtype = torch.float32) -> LoRAConfig:
    from vllm.config.lora import LoRAConfig

    return LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=dtype)


@contextmanager
def tp_rank(size: int, rank: int) -> Iterator[None]:
    """vLLM's TP rank/size lookups answer (rank, size): no process group needed."""
    from vllm.model_executor import parameter
    from vllm.model_executor.layers import linear

    with pytest.MonkeyPatch.context() as mp:
        for module in (linear, parameter):
            mp.setattr(module, "get_tensor_model_parallel_world_size", lambda: size)
            mp.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)
        yield


def shard_rows(fam: Family, size: int, rank: int) -> torch.Tensor:
    """Rows of the full output (column layers) a rank holds, in its packed order: each part
    split into `tp_shards` pieces, rank r holding piece r * shards // tp (replicated when fewer
    pieces than ranks). Checked against vLLM's own weight loader in `build`."""
    idx, start = [], 0
    for p in fam.parts:
        shards = p.tp_shards(size)
        piece, n = rank * shards // size, p.rows // shards
        idx.append(torch.arange(start + piece * n, start + (piece + 1) * n))
        start += p.rows
    return torch.cat(idx)


def build(
    fam: Family, weight: torch.Tensor, bias: torch.Tensor, size: int = 1, rank: int = 0
) -> torch.nn.Module:
    """The FLoRA layer of TP rank `rank` of `size`: vLLM base layer, its shard loaded by vLLM's
    weight_loader, weights processed (CPU GEMM dispatch), wrapped by vLLM's `from_layer`."""
    from vllm.lora.utils import from_layer

    with tp_rank(size, rank):
        base = fam.build(weight.dtype)
        for param, full in ((base.weight, weight), (base.bias, bias)):
            start = 0
            for p in fam.parts:
                if p.shard_id is None:
                    param.weight_loader(param, full)
                else:
                    param.weight_loader(param, full[start : start + p.rows], p.shard_id)
                start += p.rows
        base.quant_method.process_weights_after_loading(base)
        layer = from_layer(base, MAX_LORAS, _lora_config(weight.dtype), list(fam.packed))
    assert type(layer) is fam.flora_cls, type(layer)
    assert (layer.tp_size, layer.tp_rank) == (size, rank)
    assert layer.base_layer.weight.numel() > 0  # the plugin's GEMM hook kept the unpacked weight
    if fam.row_parallel:
        cols = slice(rank * fam.in_size // size, (rank + 1) * fam.in_size // size)
        torch.testing.assert_close(layer.base_layer.weight, weight[:, cols], rtol=0, atol=0)
        torch.testing.assert_close(layer.base_layer.bias, bias, rtol=0, atol=0, check_dtype=False)
    else:
        rows = shard_rows(fam, size, rank)
        torch.testing.assert_close(layer.base_layer.weight, weight[rows], rtol=0, atol=0)
        torch.testing.assert_close(  # vLLM keeps a bf16 bias in fp32 for its sgl GEMM
            layer.base_layer.bias, bias[rows], rtol=0, atol=0, check_dtype=False
        )
    assert layer.flora_full_shapes() == [(out, fam.in_size) for out in fam.slices]
    return layer


def fill(layer: torch.nn.Module, slot: int, adapter: Adapter | None) -> None:
    """What the plugin's `activate_adapter` does to one layer for one slot: one kind set, the
    other reset (None: the slot emptied)."""
    if adapter is None or adapter.kind == "flora":
        layer.reset_lora(slot)
        if adapter is None:
            layer.reset_flora(slot)
        else:
            layer.set_flora(slot, adapter.a, adapter.b, adapter.bias_scale)
        return
    if layer.n_slices == 1:
        layer.set_lora(slot, adapter.a[0], adapter.b[0])
    else:
        layer.set_lora(slot, adapter.a, adapter.b)
    if adapter.kind == "dora":  # as the worker arranges a DoRA model's `flora`: a = 1, b = s
        ones = [None if s is None else torch.ones(1, layer.flora_full_shapes()[0][1])
                for s in adapter.s]
        scales = [None if s is None else s.reshape(-1, 1) for s in adapter.s]
        layer.set_flora(slot, ones, scales, keep_lora=True)
    else:
        layer.reset_flora(slot)


def make_wrapper(host_counts: bool) -> tuple[PunicaWrapperCPU, Callable[..., None]]:
    """vLLM's CPU punica wrapper; `host_counts`: with the plugin's `update_metadata` hook (the
    layers read `flora_step`), else stock (they count the device indices)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(MAX_TOKENS, MAX_TOKENS, device="cpu")  # max_batches: prefill runs
    stock = PunicaWrapperCPU.update_metadata
    stock = getattr(stock, "__wrapped__", stock)
    update = worker_step._wrap_update_metadata(stock) if host_counts else stock
    return wrapper, update


def map_tokens(
    wrapper: PunicaWrapperCPU, update: Callable[..., None], slots: list[int], prefill: bool
) -> None:
    """The step's mapping: adapter id = slot + 1 (0 = none)."""
    from vllm.lora.layers import LoRAMapping

    ids = tuple(s + 1 for s in slots)
    update(wrapper, LoRAMapping(ids, ids, is_prefill=prefill), [1, 2, 3, 4], MAX_LORAS + 1, 100)
    if hasattr(wrapper, "flora_step"):
        assert wrapper.flora_step[0] == len(slots)


def _slots(gen: torch.Generator, groups: dict[int, int]) -> list[int]:
    flat = [s for s, n in groups.items() for _ in range(n)]
    return [flat[i] for i in torch.randperm(len(flat), generator=gen).tolist()]


def check(
    fam: Family,
    layer: torch.nn.Module,
    wrapper: PunicaWrapperCPU,
    update: Callable[..., None],
    weight: torch.Tensor,
    bias: torch.Tensor,
    slots: list[int],
    adapters: dict[int, Adapter],
    prefill: bool,
    gen: torch.Generator,
    what: str,
    pad: int = 0,
) -> None:
    """One pass of `apply` over a batch, compared per token and per output slice; `pad` rows past
    the step's mapping (a padded batch) must get the base output."""
    x = torch.randn(len(slots) + pad, fam.in_size, generator=gen).to(weight.dtype)
    map_tokens(wrapper, update, slots, prefill)
    got = layer.apply(x, layer.base_layer.bias)
    slots = slots + [-1] * pad
    want = dense_reference(fam, weight, bias, x, slots, adapters)
    assert got.shape == want.shape and got.dtype == weight.dtype
    # bf16: x∘a and each rank row round to bf16 (seen here: up to 0.015·(1 + |y|)); a wrong or
    # stale factor is off by ~0.3·|y|
    tol = 1e-4 if weight.dtype == torch.float32 else 5e-2
    start = 0
    for i, size in enumerate(fam.slices):
        for t, s in enumerate(slots):
            torch.testing.assert_close(
                got[t, start : start + size].double(),
                want[t, start : start + size],
                rtol=tol,
                atol=tol,
                msg=lambda m, t=t, s=s, i=i: (
                    f"{fam.name} {what}: token {t} slot {s} slice {i}: " + m
                ),
            )
        start += size
    if prefill:  # the transformers backend's [1, T, in] form gives the same rows
        again = layer.apply(x.unsqueeze(0), layer.base_layer.bias)
        torch.testing.assert_close(again[0], got, rtol=1e-6, atol=1e-6)


def _random_layer(
    fam: Family, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(fam.out_size, fam.in_size, generator=gen) / fam.in_size**0.5
    return weight.to(dtype), (0.1 * torch.randn(fam.out_size, generator=gen)).to(dtype)


# --- 1. mixed batches, set / reset / refill ------------------------------------------------------


BF16 = torch.bfloat16
MODES = {  # execution policy, host-side counts (`flora_step`), model dtype
    "expanded": ("expanded", True, torch.float32),
    "merged": ("merged", True, torch.float32),
    "auto": ("auto", True, torch.float32),
    "auto-device-counts": ("auto", False, torch.float32),
    "auto-bf16": ("auto", True, BF16),  # fp32 factors on a bf16 layer (factor_dtype)
}


@pytest.mark.parametrize(("execution", "host_counts", "dtype"), MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_mixed_batch_matches_dense_per_token_and_slice(
    env: Callable[[str], None], fam: Family, execution: str, host_counts: bool, dtype: torch.dtype
) -> None:
    env(execution)
    gen = torch.Generator().manual_seed(sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen, dtype)
    layer = build(fam, weight, bias)
    wrapper, update = make_wrapper(host_counts)
    layer.set_mapping(wrapper)
    last = len(fam.slices) - 1 if len(fam.slices) > 1 else None  # a packed layer: one slice bare
    adapters: dict[int, Adapter] = {
        0: _flora(fam, 1, gen),
        1: _flora(fam, 3, gen, scale_bias=True),  # higher rank with a scaled bias
        2: _lora(fam, 4, gen),
        3: _flora(fam, 2, gen, skip=last),
    }
    for slot, ad in adapters.items():
        fill(layer, slot, ad)

    def run(groups: dict[int, int], prefill: bool, what: str, pad: int = 0) -> None:
        slots = _slots(gen, groups)
        check(fam, layer, wrapper, update, weight, bias, slots, adapters, prefill, gen, what, pad)

    mixed = {-1: 4, 0: 4, 1: 4, 2: 4, 3: 4}
    run(mixed, True, "all slots")
    run({-1: 3, 0: 5, 2: 3}, False, "rank-1 FLoRA + LoRA (decode)")
    run({-1: 3, 2: 4}, False, "LoRA only")
    run({-1: 5}, True, "no adapter")
    run({-1: 2, 0: 3, 1: 3, 3: 2}, False, "FLoRA only, 3 padded rows", pad=3)

    for slot in (1, 3):  # emptied: their tokens see the base layer
        fill(layer, slot, None)
        del adapters[slot]
    run(mixed, True, "after reset_flora(1), reset_flora(3)")

    first = 0 if len(fam.slices) > 1 else None
    adapters.update(
        {
            1: _flora(fam, 2, gen),  # same slot, other factors and rank
            3: _flora(fam, 1, gen, skip=first),  # rank 1 now; another slice bare (packed layers)
            0: _ia3(fam, gen),  # rank 1, one input scaling, the bias scaled (IA3, not ff)
            2: _flora(fam, 4, gen),  # LoRA slot -> FLoRA
        }
    )
    for slot in (1, 3, 0, 2):
        fill(layer, slot, adapters[slot])
    run(mixed, True, "refilled slots")
    run({0: 6}, False, "refilled: one IA3 adapter only (decode)")
    run({-1: 2, 0: 3, 3: 4}, False, "refilled: rank-1 FLoRA and IA3 (decode)")
    adapters[0] = _lora(fam, 2, gen)  # IA3 slot -> LoRA: no scaled bias left behind
    fill(layer, 0, adapters[0])
    run(mixed, True, "slot 0 refilled with LoRA")
    run({-1: 2, 0: 3, 3: 4}, False, "refilled: rank-1 FLoRA + LoRA (decode)")
    run({-1: 2, 1: 3, 2: 1}, False, "refilled: FLoRA only (decode)")


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_flora_rank_limit_sizes_the_stacks(
    env: Callable[[str], None], fam: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLORA_MAX_RANK=2 under --max-lora-rank 8: FLoRA stacks hold 2 rows a slot (a quarter of
    the bytes), vLLM's LoRA stacks keep rank 8, and a mixed batch still equals the dense layer."""
    env("auto")
    cfg = FLoRAConfig(max_rank=2)
    monkeypatch.setattr(layers.base, "get_config", lambda: cfg)
    gen = torch.Generator().manual_seed(77 + sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen)
    layer = build(fam, weight, bias)
    slots = MAX_LORAS + 1
    assert [tuple(a.shape) for a in layer.flora_a] == [(slots, 2, fam.in_size)] * len(fam.slices)
    assert [tuple(b.shape) for b in layer.flora_b] == [(slots, 2, out) for out in fam.slices]
    per_slot = sum(2 * (fam.in_size + out) * 4 for out in fam.slices)
    stacks = sum(t.nbytes for t in (*layer.flora_a, *layer.flora_b))
    assert stacks == slots * per_slot
    assert layer.lora_a_stacked[0].shape[-2:] == (MAX_RANK, fam.in_size // 1)  # LoRA: rank 8
    wrapper, update = make_wrapper(True)
    layer.set_mapping(wrapper)
    adapters = {0: _flora(fam, 1, gen), 1: _flora(fam, 2, gen), 2: _lora(fam, 4, gen)}
    for slot, ad in adapters.items():
        fill(layer, slot, ad)
    groups = {-1: 3, 0: 3, 1: 3, 2: 3}
    for prefill in (True, False):
        check(fam, layer, wrapper, update, weight, bias, _slots(gen, groups), adapters, prefill,
              gen, f"FLORA_MAX_RANK=2, prefill={prefill}")


@pytest.mark.parametrize("execution", ["auto", "merged"])
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_dora_slot_applies_its_lora_and_its_scaling_to_the_same_token(
    env: Callable[[str], None], fam: Family, execution: str
) -> None:
    """A DoRA slot (LoRA weights and rank-1 output scalings both set, `keep_lora`) next to FLoRA,
    LoRA and plain tokens: each token gets s ∘ (W0 x) + bias + (s ∘ B) A x, also in passes with
    no other LoRA token (where a FLoRA slot's LoRA part is skipped); emptied, its tokens see
    the base layer; refilled as FLoRA, no LoRA part remains."""
    env(execution)
    gen = torch.Generator().manual_seed(300 + sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen)
    layer = build(fam, weight, bias)
    wrapper, update = make_wrapper(True)
    layer.set_mapping(wrapper)
    adapters = {0: _dora(fam, 4, gen), 1: _flora(fam, 1, gen), 2: _lora(fam, 2, gen)}
    for slot, ad in adapters.items():
        fill(layer, slot, ad)

    def run(groups: dict[int, int], prefill: bool, what: str) -> None:
        check(fam, layer, wrapper, update, weight, bias, _slots(gen, groups), adapters, prefill,
              gen, what)

    run({-1: 3, 0: 3, 1: 3, 2: 3}, True, "DoRA, FLoRA, LoRA, base")
    run({-1: 2, 0: 3, 1: 2}, False, "DoRA and FLoRA only (decode)")
    run({0: 4}, False, "DoRA only")
    adapters[0] = _flora(fam, 2, gen)
    fill(layer, 0, adapters[0])
    run({-1: 2, 0: 3, 1: 2}, True, "slot 0 refilled with FLoRA")
    fill(layer, 0, None)
    del adapters[0]
    run({-1: 2, 0: 3, 2: 2}, False, "slot 0 emptied")


# --- 2. tensor parallelism: per-rank shards equal the unsharded layer ----------------------------


@pytest.mark.parametrize("execution", ["expanded", "merged"])
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_tp2_shards_recombine_to_unsharded_output(
    env: Callable[[str], None], fam: Family, execution: str
) -> None:
    env(execution)
    gen = torch.Generator().manual_seed(1000 + sum(map(ord, fam.name)))
    tp = 2
    weight, bias = _random_layer(fam, gen)
    last = len(fam.slices) - 1 if len(fam.slices) > 1 else None
    adapters = {
        0: _ia3(fam, gen),  # the bias scaled: rank 0 of a row layer only, every column shard
        1: _flora(fam, 3, gen, scale_bias=True),
        2: _lora(fam, 4, gen),
        3: _flora(fam, 2, gen, skip=last),
    }
    wrapper, update = make_wrapper(True)
    full = build(fam, weight, bias)
    shards = [build(fam, weight, bias, tp, r) for r in range(tp)]
    for layer in (full, *shards):
        layer.set_mapping(wrapper)
        for slot, ad in adapters.items():
            fill(layer, slot, ad)  # every rank gets the whole adapter and slices it itself
    slots = _slots(gen, {-1: 3, 0: 3, 1: 3, 2: 3, 3: 3})
    x = torch.randn(len(slots), fam.in_size, generator=gen)
    map_tokens(wrapper, update, slots, prefill=True)
    want = full.apply(x, full.base_layer.bias)
    reference = dense_reference(fam, weight, bias, x, slots, adapters)
    torch.testing.assert_close(want.double(), reference, rtol=1e-4, atol=1e-4)
    if fam.row_parallel:  # each rank: its input columns; bias once (rank 0), then all-reduce
        n = fam.in_size // tp
        parts = [
            layer.apply(
                x[:, r * n : (r + 1) * n].contiguous(), layer.base_layer.bias if r == 0 else None
            )
            for r, layer in enumerate(shards)
        ]
        torch.testing.assert_close(sum(parts), want, rtol=1e-4, atol=1e-4)
        return
    covered = torch.zeros(fam.out_size, dtype=torch.bool)
    for r, layer in enumerate(shards):
        rows = shard_rows(fam, tp, r)
        got = layer.apply(x, layer.base_layer.bias)
        assert got.shape == (len(slots), len(rows))
        torch.testing.assert_close(
            got, want[:, rows], rtol=1e-4, atol=1e-4, msg=lambda m, r=r: f"{fam.name} rank {r}: {m}"
        )
        covered[rows] = True
    assert bool(covered.all())  # the ranks together hold every output row


# --- the GEMM hook the layers rely on ------------------------------------------------------------


def test_freed_base_weight_is_a_clear_error(
    env: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the plugin's GEMM hook vLLM frees the unpacked weight at load: wrapping must say
    so instead of serving from an empty tensor."""
    from vllm.model_executor.layers import utils as layer_utils

    hooked = layer_utils.dispatch_cpu_unquantized_gemm
    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", hooked.__wrapped__)
    fam = FAMILIES[0]
    weight, bias = _random_layer(fam, torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match="freed it after packing"):
        build(fam, weight, bias)


# --- 3. the rank-1 path: one adapter broadcast, tied input scalings as one packed GEMM -----------

PACKED = [f for f in FAMILIES if len(f.slices) > 1]
RANK1_DTYPES = {"fp32": torch.float32, "bf16": BF16}


def _tied(fam: Family, gen: torch.Generator) -> Adapter:
    """Rank 1 with one input scaling for every slice (the IA3 form), own output scalings."""
    a = 1 + 0.3 * torch.randn(1, fam.in_size, generator=gen)
    b = [(1 + 0.3 * torch.randn(out, 1, generator=gen)) * ALPHA for out in fam.slices]
    return Adapter("flora", [a.clone() for _ in fam.slices], b)


def _spy_gemms(layer: torch.nn.Module) -> list[str]:
    """Record which GEMM each pass runs: the whole packed weight or a slice's own."""
    calls: list[str] = []
    packed, slices = layer._packed_gemm, list(layer._slice_gemms)
    layer._packed_gemm = lambda x: calls.append("packed") or packed(x)
    layer._slice_gemms = [
        (lambda x, g=g, i=i: calls.append(f"slice{i}") or g(x)) for i, g in enumerate(slices)
    ]
    return calls


@pytest.mark.parametrize("dtype", RANK1_DTYPES.values(), ids=RANK1_DTYPES.keys())
@pytest.mark.parametrize("fam", PACKED, ids=[f.name for f in PACKED])
def test_tied_input_scalings_run_one_packed_gemm(
    env: Callable[[str], None], fam: Family, dtype: torch.dtype
) -> None:
    """Adapters whose input scaling is the same for every slice are flagged at `set_flora` and
    served by ONE GEMM over the whole packed weight, still equal to x (W0 ∘ B A)^T per slice;
    one untied adapter (or a refill that unties a slot) brings back a GEMM per slice."""
    env("auto")
    gen = torch.Generator().manual_seed(500 + sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen, dtype)
    layer = build(fam, weight, bias)
    wrapper, update = make_wrapper(True)
    layer.set_mapping(wrapper)
    adapters = {0: _tied(fam, gen), 1: _tied(fam, gen), 2: _flora(fam, 1, gen)}
    adapters[3] = _lora(fam, 1, gen)
    for slot, ad in adapters.items():
        fill(layer, slot, ad)
    assert layer._untied_slots == {2}
    calls = _spy_gemms(layer)

    def run(groups: dict[int, int], what: str, pad: int = 0) -> list[str]:
        calls.clear()
        check(fam, layer, wrapper, update, weight, bias, _slots(gen, groups), adapters, False,
              gen, what, pad)
        return list(calls)

    slice_calls = [f"slice{i}" for i in range(len(fam.slices))]
    assert run({-1: 3, 0: 4, 1: 4}, "tied adapters and plain tokens", pad=2) == ["packed"]
    assert run({0: 3, 1: 2, 3: 3}, "tied adapters and LoRA") == ["packed"]
    assert run({0: 3, 2: 3}, "tied + untied") == slice_calls
    fill(layer, 1, adapters[2])  # slot 1 refilled with the untied adapter: its flag follows
    adapters[1] = adapters[2]
    assert layer._untied_slots == {1, 2}
    assert run({-1: 2, 1: 4}, "refilled untied slot") == slice_calls
    fill(layer, 2, None)
    del adapters[2]
    assert layer._untied_slots == {1}  # an empty slot is the identity: tied
    skip_last = _flora(fam, 1, gen, skip=len(fam.slices) - 1)  # a bare slice keeps scaling 1
    skip_last.a[:-1] = [torch.ones(1, fam.in_size)] * (len(fam.slices) - 1)  # so: tied
    fill(layer, 2, skip_last)
    adapters[2] = skip_last
    assert layer._untied_slots == {1}
    assert run({0: 3, 2: 3}, "tied + identity input scalings") == ["packed"]


@pytest.mark.parametrize("dtype", RANK1_DTYPES.values(), ids=RANK1_DTYPES.keys())
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_one_adapter_pass_broadcasts_its_rows(
    env: Callable[[str], None], fam: Family, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every token of a pass on one rank-1 adapter: its scaling rows broadcast (no gather at
    all), equal to the dense layer; half the tokens plain (or padded) needs the gather."""
    env("auto")
    gen = torch.Generator().manual_seed(900 + sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen, dtype)
    layer = build(fam, weight, bias)
    wrapper, update = make_wrapper(True)
    layer.set_mapping(wrapper)
    adapters = {0: _flora(fam, 1, gen), 1: _tied(fam, gen), 3: _flora(fam, 1, gen)}
    for slot, ad in adapters.items():
        fill(layer, slot, ad)
    gathers: list[tuple[str, int]] = []
    gather = layers.base._gather_rows
    monkeypatch.setattr(
        layers.base,
        "_gather_rows",
        lambda role, rows, dim, index: gathers.append((role, len(index)))
        or gather(role, rows, dim, index),
    )

    def run(groups: dict[int, int], what: str, pad: int = 0) -> list[tuple[str, int]]:
        gathers.clear()
        check(fam, layer, wrapper, update, weight, bias, _slots(gen, groups), adapters, False,
              gen, what, pad)
        return list(gathers)

    for slot in adapters:
        assert run({slot: 6}, f"every token on slot {slot}") == []
    n = 6 + 6 + 2
    assert run({-1: 6, 0: 6}, "half slot 0, half plain, 2 padded", pad=2) == [("b", n), ("a", n)]
    assert run({-1: 3, 0: 3, 3: 3}, "two adapters and plain tokens")


@pytest.mark.parametrize("dtype", RANK1_DTYPES.values(), ids=RANK1_DTYPES.keys())
@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_prefill_runs_scale_run_by_run(
    env: Callable[[str], None], fam: Family, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens in long runs of one slot (prefill chunks, one request after another): each run's
    scaling rows broadcast in place, no per-token gather of a or b rows; equal to the dense layer
    for untied, tied and IA3 (a = 1, scaled bias) adapters, plain runs and padded rows. Short
    runs (decode) still gather."""
    env("auto")
    gen = torch.Generator().manual_seed(1700 + sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen, dtype)
    layer = build(fam, weight, bias)
    wrapper, update = make_wrapper(True)
    layer.set_mapping(wrapper)
    adapters = {0: _flora(fam, 1, gen), 1: _tied(fam, gen), 2: _ia3(fam, gen),
                3: _flora(fam, 1, gen, scale_bias=True)}
    for slot, ad in adapters.items():
        fill(layer, slot, ad)
    gathers: list[str] = []
    gather = layers.base._gather_rows
    monkeypatch.setattr(
        layers.base,
        "_gather_rows",
        lambda role, rows, dim, index: gathers.append(role) or gather(role, rows, dim, index),
    )

    def run(runs: list[tuple[int, int]], what: str, pad: int = 0, prefill: bool = True
            ) -> list[str]:
        gathers.clear()
        slots = [s for s, n in runs for _ in range(n)]
        check(fam, layer, wrapper, update, weight, bias, slots, adapters, prefill, gen, what, pad)
        return list(gathers)  # "a", "b": scaling rows; "d": scaled-bias rows (IA3, scale_bias)

    assert run([(0, 32), (3, 32)], "two requests' prefill chunks") == []
    monkeypatch.setattr(layers.base, "RUN_MIN_TOKENS", 4)  # more runs within the test's 64 rows
    assert run([(0, 6), (-1, 5), (3, 7), (0, 4)], "untied runs, plain run", pad=3) == []
    assert run([(1, 4), (-1, 6), (1, 5)], "tied runs") == []
    assert run([(2, 8), (-1, 4), (2, 9)], "IA3 runs (a = 1)") == []
    assert run([(2, 4), (1, 5), (3, 4), (0, 6)], "every kind in runs") == []
    assert run([(2, 12)], "one IA3 adapter for every token") == []
    assert run([(0, 12)], "one untied adapter for every token") == []
    assert run([(3, 1)], "one token, scaled bias", prefill=False) == []
    decode = [(s, 1) for s in (0, 1, 2, 3, -1) * 4]  # one token per request: 20 short runs
    assert run(decode, "short runs gather", prefill=False) == ["b", "a", "d"]


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_rank1_output_owns_its_memory(
    env: Callable[[str], None], fam: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rank-1 path keeps its temporaries in buffers that every layer call reuses: a layer's
    output must survive the next calls (of any layer), and the path without those buffers (a
    pass too large to keep one) must give the same answer."""
    env("auto")
    gen = torch.Generator().manual_seed(1300 + sum(map(ord, fam.name)))
    weight, bias = _random_layer(fam, gen)
    first, second = build(fam, weight, bias), build(fam, weight, bias)
    wrapper, update = make_wrapper(True)
    adapters = {0: _flora(fam, 1, gen), 1: _tied(fam, gen), 2: _flora(fam, 1, gen)}
    for layer in (first, second):
        layer.set_mapping(wrapper)
        for slot, ad in adapters.items():
            fill(layer, slot, ad)
    passes = [{-1: 2, 0: 3, 2: 3}, {-1: 3, 1: 4}, {2: 5}]  # untied, tied + plain, one adapter
    outputs = []
    for i, groups in enumerate(passes):
        slots = _slots(gen, groups)
        x = torch.randn(len(slots), fam.in_size, generator=gen)
        map_tokens(wrapper, update, slots, prefill=False)
        y = first.apply(x, first.base_layer.bias)
        outputs.append((y, y.clone(), x, slots))
        with monkeypatch.context() as m:
            m.setattr(layers.base, "SCRATCH_MAX_NUMEL", 0)  # every temporary fresh
            torch.testing.assert_close(first.apply(x, first.base_layer.bias), y, rtol=0, atol=0,
                                       msg=lambda m, i=i: f"pass {i} without scratch: {m}")
        second.apply(torch.randn(len(slots), fam.in_size, generator=gen), bias)  # reuses buffers
    for i, (y, kept, x, slots) in enumerate(outputs):
        assert torch.equal(y, kept), f"{fam.name}: pass {i}'s output changed by later calls"
        want = dense_reference(fam, weight, bias, x, slots, adapters)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
