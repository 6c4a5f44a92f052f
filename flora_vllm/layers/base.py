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

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.config.lora import LoRAConfig
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

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
    _flora_rank_host: list[list[int]]  # flora_ranks mirrored on the host, for planning
    _flora_version: list[int]  # bumped whenever a slot changes: keys the merged-weight cache
    _flora_uid: int  # this layer in those keys (a counter: id() may recur after a layer dies)
    _slice_gemms: list[Gemm]  # per output slice: x -> x W_slice^T (vLLM's fast GEMM on CPU)

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
        in_size = weight.shape[1]
        self.flora_a = [
            torch.zeros(max_loras + 1, rank, in_size, dtype=dt, device=dev)
            for _ in self.output_slices
        ]
        self.flora_b = [
            torch.zeros(max_loras + 1, rank, out, dtype=dt, device=dev)
            for out in self.output_slices
        ]
        for a, b in zip(self.flora_a, self.flora_b, strict=True):
            a[:, 0] = 1  # identity rows
            b[:, 0] = 1
        self.flora_ranks = torch.zeros(
            max_loras + 1, len(self.output_slices), dtype=torch.long, device=dev
        )
        self._flora_slots = set()
        self._keep_lora_slots = set()
        self._flora_rank_host = [[0] * len(self.output_slices) for _ in range(max_loras)]
        self._flora_version = [0] * max_loras
        self._flora_uid = next(_layer_uids)
        self._slice_gemms = self._build_slice_gemms(weight)
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

    def step_counts(self, n_tok: int) -> list[int]:
        """Tokens per slot in this forward pass ([no adapter, slot 0, slot 1, ...]), from the
        host-side copy the plugin keeps per step; a device count only as a fallback."""
        step = step_host_counts(self.punica_wrapper)
        if step is not None and step[0] <= n_tok:
            counts = list(step[1])
            counts[0] += n_tok - step[0]  # padded tokens carry no adapter
            return counts
        slots = step_slots(self.punica_wrapper)[:n_tok]
        counts = torch.bincount(slots + 1, minlength=len(self._flora_version) + 1).tolist()
        counts[0] += n_tok - slots.shape[0]
        return counts

    def flora_full_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) per slice as the adapter file stores them (unsharded)."""
        raise NotImplementedError

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
        self._flora_version[index] += 1
        merge_cache().drop(self._flora_uid, index)

    def set_flora(
        self,
        index: int,
        a: list[torch.Tensor | None],
        b: list[torch.Tensor | None],
        keep_lora: bool = False,
    ) -> None:
        """Put one adapter's factors (a [r, in], b [out, r], per slice; None = not adapted)
        into slot `index`, sharded like vLLM shards LoRA for tensor parallelism. keep_lora:
        the slot's LoRA weights apply too, on top of the scaled output (DoRA)."""
        self.reset_flora(index)
        if self.tp_size > 1:
            if len(self.output_slices) == 1:
                a, b = [self.slice_lora_a(a[0])], [self.slice_lora_b(b[0])]
            else:
                a, b = self.slice_lora_a(a), self.slice_lora_b(b)
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

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque node; its body runs this method eagerly
            return opaque.call(self._opaque_key, x, bias)
        x2 = x.flatten(0, -2) if x.ndim == 3 else x  # [T, in]
        fused = _runs_fused(x2)
        if fused and _in_graph(x2):  # CUDA graph capture: no host-side branch, the kernel decides
            output = lora_on_output(self, x2, self._apply_fused(x2, bias))
            return output.reshape(*x.shape[:-1], output.shape[-1])
        counts = self.step_counts(x2.shape[0])
        present = [s for s in self._flora_slots if counts[s + 1]]
        lora_tokens = any(
            n and (s not in self._flora_slots or s in self._keep_lora_slots)
            for s, n in enumerate(counts[1:])
        )
        if not present:  # no FLoRA token in this pass: the base GEMM, LoRA only if some token has
            output = self.base_layer.quant_method.apply(self.base_layer, x2, bias)
        elif fused:
            output = self._apply_fused(x2, bias)
        else:
            output = self._apply_torch(x2, bias, counts, present)
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
        """CPU: torch ops per slice; rank <= 1 as one scaled GEMM, higher ranks per segment
        (expanded rows or a merged weight, as the execution policy picks)."""
        n_tok = x2.shape[0]
        slots = step_slots(self.punica_wrapper)[:n_tok]  # [T], -1 = no adapter
        if slots.shape[0] < n_tok:  # padded tokens carry no adapter
            pad = slots.new_full((n_tok - slots.shape[0],), -1)
            slots = torch.cat([slots, pad])
        weight = self.base_layer.weight  # [sum(output_slices), in]
        execution = get_config().execution
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
