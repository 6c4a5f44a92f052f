"""Per-segment FLoRA execution policy: expanded rows or an on-the-fly merged weight (pure torch).

The expanded form costs rank x the base matmul in rows; free while the matmul is memory-bound
(GPU decode), not when it is compute-bound (the CPU, GPU prefill). The merged form builds
W_s = W0 ∘ (B_s^T A_s) once and runs the adapter's n_s tokens through it: a fixed cost of about
(r + 1) weight-sized passes, then a plain matmul. The paper's cost model (its Eq. 7) weighs
expanded FLoRA against LoRA; this one weighs the two FLoRA forms, per adapter segment:

    expanded: mm(rows_shared)                       rows_shared = plain + Σ_expanded r_s·n_s
    merged:   merge(r_s) + mm(n_s)                  (merge is free when W_s is cached)

with mm(m) = out·in·f(m) and merge(r) = out·in·(g0 + g1·r), f and g calibrated on the running
machine (a few timed matmuls, cached on disk). Both forms give the same answer up to rounding.

Runs in: the worker (calibrated once per process, cached on disk; asked per layer call).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from flora_vllm.ops.torch_ops import Gemm, dense_flora_weight, linear_gemm

MakeGemm = Callable[[torch.Tensor], Gemm]

logger = logging.getLogger("flora_vllm")

EXECUTIONS = ("auto", "expanded", "merged", "fused")  # fused: the Triton kernel (layers.py)
_CAL_ROWS = (1, 4, 16, 64, 256, 1024)


@dataclass
class CostModel:
    """Seconds per weight element: matmul of m rows (interpolated in log m) and merge of rank r."""

    rows: list[int]
    mm_per_elem: list[float]  # f(m) at each calibrated m
    merge_base: float  # g0
    merge_per_rank: float  # g1
    device: str = "cpu"
    dtype: str = "float32"

    def matmul(self, m: int, elems: int) -> float:
        """Estimated time of an [m, in] x [in, out] matmul with elems = out·in."""
        if m <= 0:
            return 0.0
        xs = self.rows
        if m <= xs[0]:
            f = self.mm_per_elem[0]
        elif m >= xs[-1]:
            f = self.mm_per_elem[-1] * m / xs[-1]  # compute-bound: linear in rows
        else:
            i = bisect.bisect_right(xs, m)
            lo, hi = math.log(xs[i - 1]), math.log(xs[i])
            w = (math.log(m) - lo) / (hi - lo)
            f = (1 - w) * self.mm_per_elem[i - 1] + w * self.mm_per_elem[i]
        return f * elems

    def merge(self, rank: int, elems: int) -> float:
        return (self.merge_base + self.merge_per_rank * rank) * elems


def plan_segments(
    seg_ranks: Sequence[int],
    seg_tokens: Sequence[int],
    seg_cached: Sequence[bool],
    n_plain: int,
    elems: int,
    cost: CostModel,
) -> list[bool]:
    """Which adapter segments to run merged (True) rather than expanded: greedy, largest
    expanded work first, flipping a segment when that lowers the layer's estimated time.
    O(S log S): this runs for every layer of every step."""
    merged = [False] * len(seg_ranks)
    shared = n_plain + sum(r * n for r, n in zip(seg_ranks, seg_tokens, strict=True))
    order = sorted(range(len(seg_ranks)), key=lambda i: -seg_ranks[i] * seg_tokens[i])
    for i in order:
        r, n, cached = seg_ranks[i], seg_tokens[i], seg_cached[i]
        if r <= 1 and not cached:
            continue  # rank 1 expanded is already one row per token: base cost
        saved = cost.matmul(shared, elems) - cost.matmul(shared - r * n, elems)
        extra = cost.matmul(n, elems) + (0.0 if cached else cost.merge(r, elems))
        if extra < saved:
            merged[i] = True
            shared -= r * n
    return merged


def _timeit(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def calibrate(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    make_gemm: MakeGemm = linear_gemm,
) -> CostModel:
    """Time the serving GEMM (`make_gemm(W)`, e.g. vLLM's packed CPU GEMM) for a few row counts,
    and the merge (W0 ∘ (B^T A), then `make_gemm` of it) for two ranks, on a size² weight."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    w = torch.randn(size, size, device=dev, dtype=dtype)
    elems = size * size

    def timed(fn) -> float:
        def run() -> None:
            fn()
            sync()

        return _timeit(run, reps=5)

    gemm = make_gemm(w)
    per_elem = []
    for m in _CAL_ROWS:
        x = torch.randn(m, size, device=dev, dtype=dtype)
        per_elem.append(timed(lambda x=x: gemm(x)) / elems)
    merge_t = {}
    for r in (1, 8):
        a = torch.randn(r, size, device=dev, dtype=dtype)
        b = torch.randn(r, size, device=dev, dtype=dtype)
        merge_t[r] = timed(lambda a=a, b=b: make_gemm(dense_flora_weight(w, a, b.T))) / elems
    g1 = max((merge_t[8] - merge_t[1]) / 7, 0.0)
    g0 = max(merge_t[1] - g1, 0.0)
    return CostModel(list(_CAL_ROWS), per_elem, g0, g1, str(dev), str(dtype).split(".")[-1])


def load_or_calibrate(
    device: str,
    dtype: torch.dtype,
    make_gemm: MakeGemm = linear_gemm,
    gemm_name: str = "linear",
    cache_dir: str | None = None,
) -> CostModel:
    """The machine's cost model, from the on-disk cache when present (one per device, dtype
    and GEMM kind)."""
    cache_dir = cache_dir or os.environ.get(
        "FLORA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "flora_vllm")
    )
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    key = f"cost_{name}_{str(dtype).split('.')[-1]}_{gemm_name}_torch{torch.__version__}"
    key = key.replace(" ", "_")
    path = os.path.join(cache_dir, key.replace("/", "_") + ".json")
    try:
        with open(path) as f:
            model = CostModel(**json.load(f))
        logger.info("flora_vllm: cost model from %s: %s", path, model)
        return model
    except (OSError, ValueError, TypeError):
        pass
    model = calibrate(device, dtype, make_gemm=make_gemm)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(asdict(model), f)
    except OSError as e:  # a read-only home still serves, it just calibrates again next time
        logger.warning("flora_vllm: cannot cache the cost model at %s: %s", path, e)
    logger.info("flora_vllm: calibrated cost model (cached at %s): %s", path, model)
    return model
