"""The shared FLoRA verbs of every `<Base>WithFLoRA` layer: slots, `set_flora` / `reset_flora`,
and the mixed-batch `apply` (worker process, once per layer call).

A slot holds a LoRA adapter (vLLM's stacked A/B, applied by punica on top of the output), a
FLoRA adapter (our stacked scalings, applied inside the base matmul by `flora_vllm.ops`; its
LoRA weights are zero and skipped), or both (DoRA: `set_flora(..., keep_lora=True)`, the LoRA
part added on top of the scaled output). Plain tokens (slot -1) get the base output. vLLM
state the layer reads (the step's slots, the CPU GEMM) comes through `hooks.worker_step`, where
those private names are version-checked.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.config.lora import LoRAConfig
from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod

from flora_vllm.config import get_config
from flora_vllm.hooks.worker_step import (
    cpu_linear,
    lora_on_output,
    make_gemm,
    slots_buffer,
    step_host_counts,
    step_slots,
)
from flora_vllm.ops import opaque
from flora_vllm.ops.merge_cache import MergedWeightCache
from flora_vllm.ops.policy import CostModel, load_or_calibrate, plan_segments
from flora_vllm.ops.torch_ops import (
    Gemm,
    _add_bias,
    factor_dtype,
    flora_linear_segments,
    linear_gemm,
    merge_slot,
)

_cost_models: dict[tuple[str, torch.dtype], CostModel] = {}
_layer_uids = itertools.count()  # merged-weight cache keys: never reused, unlike id()
_merge_cache: MergedWeightCache | None = None


def _cost_model(weight: torch.Tensor) -> CostModel:
    """This process's calibrated cost model for the weight's device and dtype (lazy, cached)."""
    key = (str(weight.device), weight.dtype)
    if key not in _cost_models:
        name = "vllm-cpu-gemm" if weight.device.type == "cpu" else "linear"
        _cost_models[key] = load_or_calibrate(str(weight.device), weight.dtype, make_gemm, name)
    return _cost_models[key]


@functools.cache
def _fused_kernel_available() -> bool:
    """True where the fused Triton FLoRA op can run (imports it, registering the custom op)."""
    from flora_vllm.ops import triton_ops

    return triton_ops.is_triton_available()


def _runs_fused(x: torch.Tensor) -> bool:
    """Whether this pass runs the fused kernel: always on CUDA (when triton imports), on the CPU
    only with FLORA_EXECUTION=fused (under Triton's interpreter)."""
    wanted = x.is_cuda or get_config().execution == "fused"
    return wanted and _fused_kernel_available()


def _in_graph(x: torch.Tensor) -> bool:
    """True while a CUDA graph captures: the pass must not branch on host-side state (the
    per-step slot counts), since every replay would keep this pass's branch. (torch.compile
    never traces `apply`: it sees one opaque node, see ops/opaque.py.)"""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def merge_cache() -> MergedWeightCache:
    """The process-wide merged-weight cache, sized by FLORA_MERGE_CACHE_MB."""
    global _merge_cache
    if _merge_cache is None:
        _merge_cache = MergedWeightCache(get_config().merge_cache_mb * 2**20)
    return _merge_cache


def _starts(sizes: tuple[int, ...] | list[int]) -> list[int]:
    """First output row of each slice."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


_last_step: list = [None, None, None]  # (flora_step, n_tok, counts): one step, every layer


def _step_counts(step: tuple[int, list[int]], n_tok: int) -> list[int]:
    """[no adapter, slot 0, ...] tokens of a pass of n_tok rows, computed once per step (the
    step's summary is a new object every step) and shared by every layer of it."""
    if _last_step[0] is not step or _last_step[1] != n_tok:
        counts = list(step[1])
        counts[0] += n_tok - step[0]  # padded tokens carry no adapter
        _last_step[:] = [step, n_tok, counts]
    return _last_step[2]


_last_active: list = [None, None]  # (counts, slots with tokens)
_last_ident: list = [None, None, None]  # (counts, max_loras, [T] slot or identity slot)
_last_runs: list = [None, None, None]  # (counts, max_loras, runs or None)
RUN_MIN_TOKENS = 16  # scale run by run when runs average at least this many tokens


def _active_slots(counts: list[int]) -> list[int]:
    """Slots with tokens in this pass, once per counts list (every layer of a step shares it)."""
    if _last_active[0] is not counts:
        _last_active[:] = [counts, [s for s, n in enumerate(counts[1:]) if n]]
    return _last_active[1]


SCRATCH_MAX_NUMEL = 2**24  # per role (a, b, x) and dtype: at most 64 MiB of fp32 kept
_scratch_buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
_scratch_views: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def _scratch(role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A temporary of this process, reused by every layer call: fresh large allocations cost
    more than the work here on the CPU (each new page faults in). Only for tensors that die
    within one `apply` (never its output); one buffer per role, grown on demand."""
    numel = math.prod(shape)
    if numel > SCRATCH_MAX_NUMEL:  # a long prefill chunk of a wide layer: not kept
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    key = (role, like.dtype, like.device)
    last = _scratch_views.get(key)
    if last is not None and last.shape == shape:  # the usual case: the same shape again
        return last
    buf = _scratch_buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = _scratch_buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    view = _scratch_views[key] = buf[:numel].view(shape)
    return view


def _gather_rows(role: str, rows: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """rows.index_select(dim, index) into a scratch buffer."""
    shape = (*rows.shape[:dim], index.shape[0], *rows.shape[dim + 1 :])
    return torch.index_select(rows, dim, index, out=_scratch(role, shape, rows))


def _scaled(x: torch.Tensor, rows: torch.Tensor, fresh: bool) -> torch.Tensor:
    """x ∘ rows in x's dtype (rows broadcast; fp32 rows for a bf16 x round once). `fresh`: rows
    is this pass's own temporary, which may take the result in place."""
    if fresh and rows.dtype == x.dtype:
        return rows.mul_(x)
    shape = (*rows.shape[:-2], *x.shape)  # rows: [1, in], [n, 1, in] or [n, T, in]
    return torch.mul(x, rows, out=_scratch("x", shape, x))


def _scale_out(
    y: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """out = b ∘ y (+ bias) in one pass, computed in the widest dtype and rounded once into out
    (which may be y itself, or a column slice of the layer's result)."""
    if bias is None:
        return torch.mul(y, b, out=out)
    return torch.addcmul(bias, y, b, out=out)


class FLoRALinearMixin:
    """Shared FLoRA verbs (`set_flora`, `reset_flora`) and the mixed-batch `apply`."""

    # Stacks have max_loras + 1 slots; the last is the identity (slot -1 maps to it), and row
    # k=0 of every slot without FLoRA at a slice is the identity too (A = 1, B = 1), so the
    # rank-1 path is a plain gather with no masking.
    flora_a: list[torch.Tensor]  # per slice [max_loras + 1, R, in_partition]
    flora_b: list[torch.Tensor]  # per slice [max_loras + 1, R, out_slice] (B^T, scale folded)
    flora_ranks: torch.Tensor  # [max_loras + 1, n_slices] int64, 0 = no FLoRA in slot/slice
    _flora_slots: set[int]  # slots holding a FLoRA adapter (host-side, no device sync)
    _keep_lora_slots: set[int]  # those among them whose LoRA weights apply too (DoRA)
    _lora_slots: set[int]  # slots vLLM gave LoRA weights at this layer (`set_lora`)
    _flora_rank_host: list[list[int]]  # flora_ranks mirrored on the host, for planning
    _high_rank_slots: set[int]  # FLoRA slots of rank > 1 on some slice
    _untied_slots: set[int]  # FLoRA slots whose input scalings differ between slices (or rank > 1)
    _scaled_in_slots: set[int]  # FLoRA slots with an input scaling other than 1 (not IA3 / DoRA)
    _a_rows: torch.Tensor  # [n_slices, max_loras + 1, in] rank row 0 of flora_a (a view)
    _b_rows: torch.Tensor  # [max_loras + 1, out] rank row 0 of flora_b, slices side by side
    _b_slices: list[torch.Tensor]  # per slice [max_loras + 1, out_slice]: its columns of _b_rows
    _flora_version: list[int]  # bumped whenever a slot changes: keys the merged-weight cache
    _flora_uid: int  # this layer in those keys (a counter: id() may recur after a layer dies)
    _bias_delta: torch.Tensor | None  # [max_loras + 1, out] (l - 1) ∘ bias per slot (IA3), or
    #   None for a layer without a bias; the identity slot's row stays 0
    _bias_slots: set[int]  # slots whose bias_delta row is not zero
    _slice_gemms: list[Gemm]  # per output slice: x -> x W_slice^T (vLLM's fast GEMM on CPU)
    _packed_gemm: Gemm  # x -> x W^T for the whole weight (vLLM's packed CPU GEMM)

    def create_lora_weights(
        self,
        max_loras: int,
        lora_config: LoRAConfig,
        model_config: PretrainedConfig | None = None,
    ) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        weight = self.base_layer.weight
        if weight.numel() == 0:
            raise RuntimeError(
                f"FLoRA needs the unpacked base weight of {self.base_layer.prefix}, but vLLM "
                "freed it after packing it for its CPU GEMM; the flora_vllm plugin hook on "
                "dispatch_cpu_unquantized_gemm did not run."
            )
        rank = get_config().rank_limit(lora_config.max_lora_rank)[0]
        dt, dev = factor_dtype(weight.dtype), weight.device  # fp32 factors for a bf16 model
        n_slices, in_size = len(self.output_slices), weight.shape[1]
        # One tensor per factor, rank rows outermost: row 0 of every slot (all the rank-1 path
        # reads) is contiguous, [n_slices, S, in] and [S, out]; the per-slice stacks are views.
        a_all = torch.zeros(rank, n_slices, max_loras + 1, in_size, dtype=dt, device=dev)
        b_all = torch.zeros(rank, max_loras + 1, weight.shape[0], dtype=dt, device=dev)
        a_all[0] = 1  # identity rows
        b_all[0] = 1
        self._a_rows, self._b_rows = a_all[0], b_all[0]
        self._b_slices = list(self._b_rows.split(list(self.output_slices), dim=1))
        self.flora_a = [a_all[:, i].transpose(0, 1) for i in range(n_slices)]
        self.flora_b = [
            b_all[:, :, start : start + out].transpose(0, 1)
            for start, out in zip(_starts(self.output_slices), self.output_slices, strict=True)
        ]
        self.flora_ranks = torch.zeros(max_loras + 1, n_slices, dtype=torch.long, device=dev)
        self._flora_slots = set()
        self._keep_lora_slots = set()
        self._lora_slots = set()
        self._flora_rank_host = [[0] * n_slices for _ in range(max_loras)]
        self._high_rank_slots, self._untied_slots, self._scaled_in_slots = set(), set(), set()
        self._flora_version = [0] * max_loras
        self._flora_uid = next(_layer_uids)
        bias = self.base_layer.bias
        self._bias_delta = None if bias is None else torch.zeros(
            max_loras + 1, weight.shape[0], dtype=dt, device=dev
        )
        self._bias_slots = set()
        self._slice_gemms = self._build_slice_gemms(weight)
        self._packed_gemm = self._build_packed_gemm(weight)
        self._opaque_key = opaque.register(
            f"linear:{self.base_layer.prefix}", self.apply, opaque.linear_fake(weight.shape[0])
        )

    def _build_slice_gemms(self, weight: torch.Tensor) -> list[Gemm]:
        """One GEMM per output slice (FLoRA scales each slice's input on its own). On the CPU a
        packed layer (qkv, gate_up) keeps vLLM's whole-weight packed GEMM too: batches with no
        FLoRA token take it, and per-slice GEMMs + concatenation cost 10-30% more there."""
        fn = cpu_linear(self.base_layer)
        if weight.device.type == "cpu" and fn is not None and len(self.output_slices) == 1:
            return [lambda x: fn(x, weight, None)]
        return [make_gemm(w) for w in weight.split(list(self.output_slices))]

    def _build_packed_gemm(self, weight: torch.Tensor) -> Gemm:
        """The whole layer's GEMM without bias: vLLM's packed CPU GEMM (the plain server's),
        `F.linear` elsewhere. Rank-1 passes whose input scalings agree across slices take it."""
        fn = cpu_linear(self.base_layer)
        if weight.device.type == "cpu" and fn is not None:
            return lambda x: fn(x, weight, None)
        return linear_gemm(weight)

    def step_counts(self, n_tok: int) -> list[int]:
        """Tokens per slot in this forward pass ([no adapter, slot 0, slot 1, ...]), from the
        host-side copy the plugin keeps per step; a device count only as a fallback. The list
        is shared by every layer of the step: read it, never change it."""
        step = step_host_counts(self.punica_wrapper)
        if step is not None and step[0] <= n_tok:
            return _step_counts(step, n_tok)
        slots = step_slots(self.punica_wrapper)[:n_tok]
        counts = torch.bincount(slots + 1, minlength=len(self._flora_version) + 1).tolist()
        counts[0] += n_tok - slots.shape[0]
        return counts

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) per slice as the adapter file stores them (unsharded)."""
        raise NotImplementedError

    def set_lora(self, index: int, *args: object, **kwargs: object) -> None:
        """vLLM's `set_lora`, remembering that slot `index` has LoRA weights here: a pass whose
        adapters hold none at this layer (IA3 on other modules, FLoRA) skips punica."""
        super().set_lora(index, *args, **kwargs)
        self._lora_slots.add(index)

    def reset_lora(self, index: int) -> None:
        """vLLM's `reset_lora` (the slot's LoRA weights zeroed), forgetting slot `index`."""
        self._lora_slots.discard(index)
        super().reset_lora(index)

    def reset_flora(self, index: int) -> None:
        """Forget the FLoRA adapter of slot `index` (its tokens then see the base weight)."""
        self.flora_ranks[index] = 0
        for a, b in zip(self.flora_a, self.flora_b, strict=True):
            a[index] = 0
            b[index] = 0
            a[index, 0] = 1  # identity row for the rank-1 path
            b[index, 0] = 1
        self._flora_slots.discard(index)
        self._keep_lora_slots.discard(index)
        self._flora_rank_host[index] = [0] * len(self.output_slices)
        for kind in (self._high_rank_slots, self._untied_slots, self._scaled_in_slots):
            kind.discard(index)  # an empty slot is the identity: rank 1, tied, unscaled
        if self._bias_delta is not None:
            self._bias_delta[index] = 0
        self._bias_slots.discard(index)
        self._flora_version[index] += 1
        merge_cache().drop(self._flora_uid, index)

    def set_flora(
        self,
        index: int,
        a: list[torch.Tensor | None],
        b: list[torch.Tensor | None],
        bias_scale: list[torch.Tensor | None] | None = None,
        keep_lora: bool = False,
    ) -> None:
        """Put one adapter's factors (a [r, in], b [out, r], per slice; None = not adapted)
        into slot `index`, sharded like vLLM shards LoRA for tensor parallelism. bias_scale:
        per slice [out] (or None) scaling the layer's bias for this slot's tokens (IA3 on a
        non-feed-forward module: l ∘ (W0 x + bias)). keep_lora: the slot's LoRA weights apply
        too, on top of the scaled output (DoRA)."""
        self.reset_flora(index)
        scales = [None if s is None else s.reshape(-1, 1) for s in bias_scale or [None] * len(b)]
        if self.tp_size > 1:
            if len(self.output_slices) == 1:
                a, b = [self.slice_lora_a(a[0])], [self.slice_lora_b(b[0])]
                scales = [None if scales[0] is None else self.slice_lora_b(scales[0])]
            else:
                a, b = self.slice_lora_a(a), self.slice_lora_b(b)
                scales = self.slice_lora_b(scales)
        self._set_bias_scale(index, scales)
        for i, (a_i, b_i) in enumerate(zip(a, b, strict=True)):
            if a_i is None or b_i is None:
                continue
            r = a_i.shape[0]
            self.flora_a[i][index, :r].copy_(a_i, non_blocking=True)
            self.flora_b[i][index, :r].copy_(b_i.t(), non_blocking=True)
            self.flora_ranks[index, i] = r
            self._flora_rank_host[index][i] = r
        if any(a_i is not None for a_i in a):
            self._flora_slots.add(index)
            if keep_lora:
                self._keep_lora_slots.add(index)
        rows = self._a_rows[:, index]  # [n_slices, in]: every slice's input scaling, rank row 0
        high_rank = max(self._flora_rank_host[index]) > 1
        if high_rank:
            self._high_rank_slots.add(index)
        if high_rank or not bool((rows == rows[:1]).all()):
            self._untied_slots.add(index)
            self._scaled_in_slots.add(index)
        elif not bool((rows[0] == 1).all()):
            self._scaled_in_slots.add(index)

    @torch.no_grad()  # vLLM 0.29's bias requires grad outside the engine's inference mode
    def _set_bias_scale(self, index: int, scales: list[torch.Tensor | None]) -> None:
        """Slot `index` adds (l - 1) ∘ bias to its tokens' outputs, per slice with a scaling l
        ([out_slice, 1], this rank's rows), so they get l ∘ bias. A row-parallel layer adds its
        bias once, after the all-reduce: only rank 0 holds the term there."""
        if all(s is None for s in scales):
            return
        bias = self.base_layer.bias
        if bias is None:
            raise ValueError(f"{self.base_layer.prefix} has no bias to scale")
        if isinstance(self.base_layer, RowParallelLinear) and self.tp_rank > 0:
            return
        delta = self._bias_delta
        for start, size, s in zip(_starts(self.output_slices), self.output_slices, scales,
                                  strict=True):
            if s is not None:
                delta[index, start : start + size] = (s[:, 0].float() - 1) * bias[
                    start : start + size
                ].float()
        self._bias_slots.add(index)

    def _add_bias_delta(
        self, output: torch.Tensor, counts: list[int] | None, present: list[int]
    ) -> torch.Tensor:
        """output += this pass's slots' (l - 1) ∘ bias rows (IA3's scaled bias); counts None:
        under CUDA-graph capture, always (the device slots decide, no host branch). Tokens in
        long runs of one slot (prefill) add their slot's row per run, without a gather."""
        delta = self._bias_delta
        if counts is None:
            slots = slots_buffer(self.punica_wrapper)[: output.shape[0]]
            return output.add_(delta[torch.remainder(slots, delta.shape[0])])
        if self._bias_slots.isdisjoint(present):
            return output
        n_tok = output.shape[0]
        runs = self._pass_runs(counts, present, n_tok)
        if runs is not None:
            for t0, t1, s in runs:
                if s in self._bias_slots:
                    output[t0:t1].add_(delta[s])
            return output
        rows = _gather_rows("d", delta, 0, self._identity_slots(counts, n_tok))  # [T, out]
        return output.add_(rows)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque node; its body runs this method eagerly
            return opaque.call(self._opaque_key, x, bias)
        if torch.is_grad_enabled():  # outside vLLM's inference mode (layer tests; vLLM 0.29's
            with torch.no_grad():  # weights require grad there): the out= ops refuse autograd
                return FLoRALinearMixin.apply(self, x, bias)
        x2 = x.flatten(0, -2) if x.ndim == 3 else x  # [T, in]
        fused = _runs_fused(x2)
        if fused and _in_graph(x2):  # CUDA graph capture: no host-side branch, the kernel decides
            output = self._apply_fused(x2, bias)
            if self._bias_delta is not None:
                output = self._add_bias_delta(output, None, [])
            output = lora_on_output(self, x2, output)
            return output.reshape(*x.shape[:-1], output.shape[-1])
        counts = self.step_counts(x2.shape[0])
        active = _active_slots(counts)
        flora = self._flora_slots
        present = [s for s in active if s in flora] if flora else []
        lora_here = self._lora_slots.intersection(active)  # LoRA weights here: a LoRA slot,
        lora_tokens = bool(lora_here) and (  # or DoRA's LoRA part
            not lora_here <= flora or not lora_here.isdisjoint(self._keep_lora_slots)
        )
        if not present:  # no FLoRA token in this pass: the base GEMM, LoRA only if some token has
            output = self.base_layer.quant_method.apply(self.base_layer, x2, bias)
        elif fused:
            output = self._apply_fused(x2, bias)
        else:
            output = self._apply_torch(x2, bias, counts, present)
        if present and self._bias_slots:
            output = self._add_bias_delta(output, counts, present)
        if lora_tokens:  # punica adds LoRA for LoRA and DoRA slots (FLoRA's hold zero weights)
            output = lora_on_output(self, x2, output)
        return output.reshape(*x.shape[:-1], output.shape[-1])

    def _apply_torch(
        self,
        x2: torch.Tensor,
        bias: torch.Tensor | None,
        counts: list[int],
        present: list[int],
    ) -> torch.Tensor:
        """CPU: rank <= 1 everywhere as scaled GEMMs (`_apply_rank1`); otherwise torch ops per
        slice, higher ranks per segment (expanded rows or a merged weight, as the execution
        policy picks)."""
        execution = get_config().execution
        if execution != "merged" and self._high_rank_slots.isdisjoint(present):
            return self._apply_rank1(x2, bias, counts, present)
        n_tok = x2.shape[0]
        slots = self._token_slots(n_tok)  # [T], -1 = no adapter
        weight = self.base_layer.weight  # [sum(output_slices), in]
        n_slots = len(self._flora_version)
        ident = torch.remainder(slots, n_slots + 1)  # [T]; -1 -> the identity slot
        outs, start = [], 0
        for i, size in enumerate(self.output_slices):
            w_i = weight[start : start + size]
            b_i = None if bias is None else bias[start : start + size]
            max_rank = max((self._flora_rank_host[s][i] for s in present), default=0)
            if max_rank <= 1 and execution != "merged":  # base cost: scale rows, one GEMM
                y = self._slice_gemms[i]((x2 * self.flora_a[i][ident, 0]).to(x2.dtype))
                outs.append(_add_bias(y.mul_(self.flora_b[i][ident, 0]), b_i))  # rounds once
            else:
                outs.append(
                    flora_linear_segments(
                        x2,
                        w_i,
                        b_i,
                        slots,
                        self.flora_a[i],
                        self.flora_b[i],
                        self.flora_ranks[:, i],
                        self._merged_weights(i, w_i, counts, execution),
                        self._slice_gemms[i],
                    )
                )
            start += size
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [T, out]

    def _token_slots(self, n_tok: int) -> torch.Tensor:
        """[T] adapter slot per token, -1 for none (padded tokens included)."""
        slots = step_slots(self.punica_wrapper)[:n_tok]
        if slots.shape[0] < n_tok:  # padded tokens carry no adapter
            pad = slots.new_full((n_tok - slots.shape[0],), -1)
            slots = torch.cat([slots, pad])
        return slots

    def _identity_slots(self, counts: list[int], n_tok: int) -> torch.Tensor:
        """[T] slot per token with -1 (plain, padded) mapped to the identity slot; once per step
        (per `counts` list, which every layer of the step shares)."""
        n_slots = len(self._flora_version)
        if _last_ident[0] is not counts or _last_ident[1] != n_slots:
            ident = torch.remainder(self._token_slots(n_tok), n_slots + 1)
            _last_ident[:] = [counts, n_slots, ident]
        return _last_ident[2]

    def _runs(self, counts: list[int], n_tok: int) -> list[tuple[int, int, int]] | None:
        """(first token, end, slot) of each run of consecutive tokens on one slot (the identity
        slot for plain and padded tokens), once per step; None when the runs are short (decode:
        one token per request), where per-token gathers cost less than an op per run."""
        n_slots = len(self._flora_version)
        if _last_runs[0] is not counts or _last_runs[1] != n_slots:
            runs = None
            if n_tok >= RUN_MIN_TOKENS:
                ident = self._identity_slots(counts, n_tok)
                slots, lengths = torch.unique_consecutive(ident, return_counts=True)
                if len(lengths) * RUN_MIN_TOKENS <= n_tok:
                    ends = lengths.cumsum(0).tolist()
                    runs = [
                        (end - n, end, s)
                        for end, n, s in zip(ends, lengths.tolist(), slots.tolist(), strict=True)
                    ]
            _last_runs[:] = [counts, n_slots, runs]
        return _last_runs[2]

    def _pass_runs(
        self, counts: list[int], present: list[int], n_tok: int
    ) -> list[tuple[int, int, int]] | None:
        """The pass as runs of one slot: one run when a single adapter has every token (any T),
        else the step's long runs (`_runs`), or None (short runs: gather per token)."""
        if len(present) == 1 and counts[present[0] + 1] == n_tok:
            return [(0, n_tok, present[0])]
        return self._runs(counts, n_tok)

    def _apply_rank1(
        self,
        x2: torch.Tensor,
        bias: torch.Tensor | None,
        counts: list[int],
        present: list[int],
    ) -> torch.Tensor:
        """Every adapter of the pass has rank <= 1 on every slice: y = b ∘ (W (a ∘ x)) + bias
        per slice, i.e. the packed GEMM's multiply-adds plus one pass over the input (scaling)
        and one over the output (scaling, bias and the slices' placement, fused).

        Tokens in long runs of one slot (one adapter for the pass; prefill chunks): each run's
        rows broadcast over its tokens, in place (`_apply_rank1_runs`). Otherwise (decode) the
        rows are gathered per token. Input scalings all 1 (IA3 scaling outputs, DoRA): vLLM's
        packed GEMM on x as it is. Input scalings the same for every slice of each adapter here
        (not in `_untied_slots`, checked at `set_flora`; plain tokens too): one packed GEMM over
        the whole weight (vLLM's own). Otherwise one scaled copy of the input per slice, in one
        op, and a GEMM per slice (vLLM's, on a packed copy of the slice) whose output is scaled
        straight into its columns of the one result tensor. Factors may be fp32 for a bf16
        model: scaled rows round once to x's dtype before a GEMM, and the output scaling (with
        the bias) runs in fp32 and rounds once."""
        n_tok = x2.shape[0]
        runs = self._pass_runs(counts, present, n_tok)
        if runs is not None:
            return self._apply_rank1_runs(x2, bias, present, runs)
        ident = self._identity_slots(counts, n_tok)  # [T], the identity slot for plain tokens
        b_rows = _gather_rows("b", self._b_rows, 0, ident)  # [T, out]
        if self._scaled_in_slots.isdisjoint(present):  # inputs unscaled (IA3 on outputs, DoRA)
            y = self._packed_gemm(x2)  # [T, out]
            return _scale_out(y, b_rows, bias, out=y)
        if len(self.output_slices) == 1 or self._untied_slots.isdisjoint(present):
            a = _gather_rows("a", self._a_rows[0], 0, ident)  # [T, in]
            y = self._packed_gemm(_scaled(x2, a, fresh=True))  # [T, out]
            return _scale_out(y, b_rows, bias, out=y)
        a = _gather_rows("a", self._a_rows, 1, ident)  # [n_slices, T, in]
        xs = _scaled(x2, a, fresh=True)  # [n_slices, T, in]
        sizes = self.output_slices
        y = x2.new_empty(n_tok, self._b_rows.shape[1])  # [T, out]
        biases = [None] * len(sizes) if bias is None else bias.split(sizes)
        for gemm, x_i, b_i, bias_i, y_i in zip(
            self._slice_gemms, xs, b_rows.split(sizes, -1), biases, y.split(sizes, 1), strict=True
        ):
            _scale_out(gemm(x_i), b_i, bias_i, out=y_i)  # y_i: the slice's columns of y
        return y

    def _apply_rank1_runs(
        self,
        x2: torch.Tensor,
        bias: torch.Tensor | None,
        present: list[int],
        runs: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """`_apply_rank1` for tokens in a few long runs of one slot each: every run's scaling
        rows broadcast over its tokens, written in place, so no [T, in] / [T, out] gathered rows
        are written and read again (on these CPUs each such pass over a prefill chunk's outputs
        costs several percent of the GEMM). One run (the whole pass on one adapter, a single
        decode token included) indexes no token range: the Python per call is what T=1 costs."""
        a_tab, b_tab = self._a_rows, self._b_rows  # [n_slices, S + 1, in], [S + 1, out]
        whole = len(runs) == 1
        if self._scaled_in_slots.isdisjoint(present):
            y = self._packed_gemm(x2)  # [T, out]
        elif len(self.output_slices) == 1 or self._untied_slots.isdisjoint(present):
            xs = _scratch("x", tuple(x2.shape), x2)  # [T, in]
            if whole:
                torch.mul(x2, a_tab[0, runs[0][2]], out=xs)
            else:
                for t0, t1, s in runs:
                    torch.mul(x2[t0:t1], a_tab[0, s], out=xs[t0:t1])
            y = self._packed_gemm(xs)  # [T, out]
        else:
            return self._apply_rank1_runs_slices(x2, bias, runs)
        if whole:
            return _scale_out(y, b_tab[runs[0][2]], bias, out=y)
        for t0, t1, s in runs:
            _scale_out(y[t0:t1], b_tab[s], bias, out=y[t0:t1])
        return y

    def _apply_rank1_runs_slices(
        self, x2: torch.Tensor, bias: torch.Tensor | None, runs: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """`_apply_rank1_runs` where the slices' input scalings differ: every slice's scaled
        input rows of a run in one op, a GEMM per slice, its output scaled into its columns."""
        a_tab, sizes = self._a_rows, self.output_slices  # a_tab: [n_slices, S + 1, in]
        xs = _scratch("x", (len(sizes), *x2.shape), x2)  # [n_slices, T, in]
        y = x2.new_empty(x2.shape[0], self._b_rows.shape[1])  # [T, out]
        biases = [None] * len(sizes) if bias is None else bias.split(sizes)
        parts = zip(self._slice_gemms, xs, self._b_slices, biases, y.split(sizes, 1), strict=True)
        if len(runs) == 1:  # the whole pass on one slot: no token ranges
            s = runs[0][2]
            torch.mul(x2, a_tab[:, s : s + 1], out=xs)  # [n_slices, 1, in] over every token
            for gemm, x_i, b_i, bias_i, y_i in parts:
                _scale_out(gemm(x_i), b_i[s], bias_i, out=y_i)
            return y
        for t0, t1, s in runs:  # every slice's scaled rows of the run in one op
            torch.mul(x2[t0:t1], a_tab[:, s : s + 1], out=xs[:, t0:t1])
        for gemm, x_i, b_i, bias_i, y_i in parts:
            out_i = gemm(x_i)  # [T, size]
            for t0, t1, s in runs:  # into the slice's columns of y
                _scale_out(out_i[t0:t1], b_i[s], bias_i, out=y_i[t0:t1])
        return y

    def _apply_fused(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The fused Triton kernel per slice (CUDA; the CPU under TRITON_INTERPRET=1). It reads
        the slots of the first T tokens from the punica buffer itself (a fixed address across
        CUDA-graph replays) and the ranks on the device: no host sync, so a captured graph stays
        valid when adapters come and go. The per-segment merge policy is a CPU torch feature."""
        slots = slots_buffer(self.punica_wrapper)  # [max_batched_tokens] >= T
        weight = self.base_layer.weight
        outs, start = [], 0
        for i, size in enumerate(self.output_slices):
            outs.append(
                torch.ops.flora.flora_linear(
                    x2,
                    weight[start : start + size],
                    None if bias is None else bias[start : start + size],
                    slots,
                    self.flora_a[i],
                    self.flora_b[i],
                    self.flora_ranks[:, i],
                )
            )
            start += size
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [T, out]

    def _merged_weights(
        self, i: int, w_i: torch.Tensor, counts: list[int], execution: str
    ) -> dict[int, Gemm]:
        """slot -> merged-weight GEMM for the adapter segments of slice i that run merged this pass:
        all of them under `merged`, those the cost model picks under `auto`, none otherwise."""
        if execution == "expanded":
            return {}
        segs = [
            s for s in sorted(self._flora_slots) if counts[s + 1] and self._flora_rank_host[s][i]
        ]
        if not segs:
            return {}
        cache = merge_cache()
        keys = [(self._flora_uid, i, s, self._flora_version[s]) for s in segs]
        cached = [cache.get(k) for k in keys]
        ranks = [self._flora_rank_host[s][i] for s in segs]
        if execution == "merged":
            chosen = [True] * len(segs)
        else:
            tokens = [counts[s + 1] for s in segs]
            chosen = plan_segments(
                ranks,
                tokens,
                [c is not None for c in cached],
                sum(counts) - sum(tokens),
                w_i.numel(),
                _cost_model(w_i),
            )
        merged = {}
        for s, key, gemm, r, use in zip(segs, keys, cached, ranks, chosen, strict=True):
            if use:
                if gemm is None:
                    gemm = make_gemm(merge_slot(w_i, self.flora_a[i], self.flora_b[i], s, r))
                    cache.put(key, gemm, 2 * w_i.numel() * w_i.element_size())
                merged[s] = gemm
        return merged

    @classmethod
    def can_replace_layer(
        cls,
        source_layer: nn.Module,
        lora_config: LoRAConfig,
        packed_modules_list: list,
        model_config: PretrainedConfig | None = None,
    ) -> bool:
        """vLLM's rule for the parent class, restricted to unquantized weights."""
        return isinstance(
            getattr(source_layer, "quant_method", None), UnquantizedLinearMethod
        ) and super().can_replace_layer(
            source_layer=source_layer,
            lora_config=lora_config,
            packed_modules_list=packed_modules_list,
            model_config=model_config,
        )
