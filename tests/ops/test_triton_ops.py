"""The fused Triton FLoRA kernel equals the torch op and the dense per-token layer W0 ∘ (B A).

On a GPU the kernel tests run compiled, plus bf16/fp16 at the Llama-2-7B shape. On a CPU they
run under Triton's interpreter, which must be switched on before triton is first imported (by
the time this module loads, vLLM or torch may have imported it): `test_kernel_under_interpreter`
reruns this file in a child pytest with TRITON_INTERPRET=1, or run it directly that way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from flora_vllm.ops import triton_ops
from flora_vllm.ops.torch_ops import dense_flora_weight, flora_linear
from flora_vllm.ops.triton_ops import KernelConfig, flora_linear_triton

if not triton_ops.is_triton_available():
    pytest.skip("triton is not installed: no kernel to test", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
RUNS_HERE = ON_GPU or triton_ops.interpreter_active()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_kernel = pytest.mark.skipif(
    not RUNS_HERE,
    reason="CPU without TRITON_INTERPRET=1 at start: run by test_kernel_under_interpreter",
)

# Forced tiles on top of the default pick: one rank row at a time with several N and K blocks,
# and rank chunks of 2 so rank 3 and rank 8 span several chunks.
CONFIGS = [None, KernelConfig(16, 16, 16, 1), KernelConfig(16, 32, 32, 2)]


@pytest.mark.skipif(RUNS_HERE, reason="the kernel tests run in this process")
def test_kernel_under_interpreter():
    """This file again, in a child pytest whose triton is imported with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        os.path.abspath(__file__),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]


def _inputs(
    n_tok: int,
    n_in: int,
    n_out: int,
    slot_ranks: list[int],
    seed: int,
    with_bias: bool = True,
    dtype: torch.dtype = torch.float32,
    max_rank: int = 8,
) -> tuple[torch.Tensor, ...]:
    """x, W0, bias, slots (every slot and -1 present), A, B^T, ranks; rows >= rank are NaN."""
    gen = torch.Generator().manual_seed(seed)
    s = len(slot_ranks)
    a = torch.full((s, max_rank, n_in), float("nan"))
    b = torch.full((s, max_rank, n_out), float("nan"))
    for i, r in enumerate(slot_ranks):
        a[i, :r] = 1 + 0.3 * torch.randn(r, n_in, generator=gen)
        b[i, :r] = (1 + 0.3 * torch.randn(r, n_out, generator=gen)) / r
    x = torch.randn(n_tok, n_in, generator=gen)
    weight = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    bias = torch.randn(n_out, generator=gen) if with_bias else None
    slots = torch.arange(n_tok) % (s + 1) - 1  # -1, 0, 1, ..., s-1, -1, ...
    slots = slots[torch.randperm(n_tok, generator=gen)]
    out = (x, weight, bias, slots, a, b, torch.tensor(slot_ranks))
    return tuple(
        None if t is None else t.to(DEVICE, dtype if t.is_floating_point() else t.dtype)
        for t in out
    )


def _dense_reference(x, weight, bias, slots, a, b, ranks) -> torch.Tensor:
    """Build W_i per token and run it: the slow, obviously right answer (b is B^T)."""
    rows = []
    for t in range(x.shape[0]):
        s = int(slots[t])
        w = weight
        if 0 <= s < len(ranks) and ranks[s] > 0:
            r = int(ranks[s])
            w = dense_flora_weight(weight, a[s, :r], b[s, :r].T)
        rows.append(x[t] @ w.T + (0 if bias is None else bias))
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize("config", CONFIGS, ids=["auto", "rank1-chunk", "rank2-chunk"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_torch_op_and_dense(with_bias, config):
    """Ranks 1, 2, 3, 8 and a rank-0 slot in one batch, plain tokens between, odd shapes."""
    args = _inputs(7, 37, 53, [1, 2, 3, 8, 0], seed=0, with_bias=with_bias)
    got = flora_linear_triton(*args, config=config)
    assert got.shape == (7, 53) and got.dtype == torch.float32
    torch.testing.assert_close(got, flora_linear(*args), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, _dense_reference(*args), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_several_token_blocks():
    args = _inputs(40, 24, 20, [2, 8, 1, 0], seed=1)
    got = flora_linear_triton(*args, config=KernelConfig(16, 16, 16, 4))
    torch.testing.assert_close(got, _dense_reference(*args), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_identity_factors_give_base_output():
    x, weight, bias = _inputs(9, 16, 12, [1], seed=2)[:3]
    for r in (1, 4):
        a = torch.ones(1, r, 16, device=DEVICE)
        b = torch.full((1, r, 12), 1.0 / r, device=DEVICE)  # (alpha / r) folded in, alpha = 1
        slots = torch.zeros(9, dtype=torch.long, device=DEVICE)
        got = flora_linear_triton(x, weight, bias, slots, a, b, torch.tensor([r], device=DEVICE))
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias))


@needs_kernel
def test_plain_tokens_never_read_the_stacks():
    """Slot -1, a rank-0 slot and an out-of-range slot all give the base row (stacks are NaN)."""
    x, weight, bias = _inputs(5, 8, 6, [1], seed=3)[:3]
    a = torch.full((2, 4, 8), float("nan"), device=DEVICE)
    b = torch.full((2, 4, 6), float("nan"), device=DEVICE)
    slots = torch.tensor([-1, 1, 2, -1, 1], device=DEVICE)
    got = flora_linear_triton(x, weight, bias, slots, a, b, torch.tensor([0, 0], device=DEVICE))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias))


@needs_kernel
def test_graph_padding_and_strided_views():
    """What CUDA graphs and packed layers hand over: slot tensors shorter or longer than the
    batch, a strided rank column (`flora_ranks[:, i]`) and a row slice of a packed weight."""
    x, weight, bias, slots, a, b, ranks = _inputs(6, 24, 40, [2, 1, 3], seed=4)
    ranks2 = torch.stack([ranks, torch.zeros_like(ranks)], dim=1)[:, 0]  # stride 2
    w_half, bias_half, b_half = weight[8:32], bias[8:32], b[:, :, 8:32]
    want = flora_linear(x, w_half, bias_half, slots, a, b_half, ranks)
    got = flora_linear_triton(x, w_half, bias_half, slots, a, b_half, ranks2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    longer = torch.cat([slots, torch.tensor([0, 2], device=DEVICE)])  # tail past T ignored
    got = flora_linear_triton(x, weight, bias, longer, a, b, ranks)
    torch.testing.assert_close(
        got, flora_linear(x, weight, bias, slots, a, b, ranks), rtol=1e-4, atol=1e-4
    )

    padded = slots.clone()
    padded[4:] = -1
    got = flora_linear_triton(x, weight, bias, slots[:4], a, b, ranks)  # tokens 4, 5: plain
    torch.testing.assert_close(
        got, flora_linear(x, weight, bias, padded, a, b, ranks), rtol=1e-4, atol=1e-4
    )


@needs_kernel
def test_custom_op_under_torch_compile():
    """`flora::flora_linear` traces as one node (fullgraph, dynamic batch) and passes opcheck."""
    op = torch.ops.flora.flora_linear.default

    def layer(x, weight, bias, slots, a, b, ranks):
        return torch.relu(op(x, weight, bias, slots, a, b, ranks)) + 1

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for n_tok in (5, 11):
        args = _inputs(n_tok, 20, 18, [1, 4, 0], seed=5)
        torch.testing.assert_close(
            compiled(*args), torch.relu(flora_linear(*args)) + 1, rtol=1e-4, atol=1e-4
        )
    torch.library.opcheck(op, _inputs(5, 20, 18, [1, 4, 0], seed=6))


@needs_kernel
def test_kernel_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "kernel_bench", os.path.join(REPO_ROOT, "benchmarks", "kernel_bench.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--smoke", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("kernel_*-smoke.json")
    assert json.loads(path.read_text())["results"] == report["results"]
    assert len(report["results"]) == 4  # T in (1, 4) x ranks (1, 2)
    for row in report["results"]:
        assert row["fused"]["p50_us"] > 0 and row["fused_max_rel_err"] < 1e-4, row


@pytest.mark.skipif(RUNS_HERE, reason="GPU: compiled for real; interpreter: nothing to compile")
@pytest.mark.parametrize("n_tok, max_rank", [(1, 8), (256, 1)], ids=["decode-r8", "prefill-r1"])
def test_compiles_for_hopper(n_tok, max_rank):
    """Without a GPU, still run Triton's whole compile (to sm_90 cubin, ptxas included) for the
    bf16 tiles the launcher picks: the interpreter accepts code the compiler rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton_ops._kernel()
    cfg = triton_ops.pick_config(n_tok, 4096, max_rank, torch.bfloat16)
    consts = {
        "HAS_BIAS": True,
        "DOT_PRECISION": "tf32",
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "RANK_CHUNK": cfg.rank_chunk,
    }
    ints = {"slots_ptr": "*i64", "ranks_ptr": "*i64"}
    sig = {
        n: "constexpr" if n in consts else ints.get(n, "*bf16" if n.endswith("_ptr") else "i32")
        for n in fn.arg_names
    }
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel = triton.compile(
        ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts
    )
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled kernel, bf16/fp16)")
@pytest.mark.parametrize(
    "slot_ranks", [[1], [2], [4], [8], [1, 2, 4, 8, 0]], ids=["r1", "r2", "r4", "r8", "mixed"]
)
@pytest.mark.parametrize("n_tok", [1, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_half_precision_llama_shape(dtype, n_tok, slot_ranks):
    """Llama-2-7B 4096x4096 against the fp32 torch op on the same rounded inputs; the fused
    kernel (fp32 accumulation, one rounding at the end) must be no worse than the torch op in
    the same dtype, which rounds every rank row."""
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    args = _inputs(n_tok, 4096, 4096, slot_ranks, seed=7, dtype=dtype)
    fp32 = tuple(t if t is None or not t.is_floating_point() else t.float() for t in args)
    want = flora_linear(*fp32)
    got = flora_linear_triton(*args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    err_fused = (got.float() - want).abs().max()
    err_torch = (flora_linear(*args).float() - want).abs().max()
    assert err_fused <= 2 * err_torch + tol / 4, (err_fused, err_torch)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (CUDA graph capture)")
def test_gpu_cuda_graph_replay_follows_new_slots_and_ranks():
    """One captured launch serves any later batch: slots, ranks and factors are read on the
    device at replay (no host sync, no value baked in), as vLLM's captured decode needs."""
    args = _inputs(16, 256, 128, [1, 4, 8, 0], seed=8, dtype=torch.bfloat16)
    op = torch.ops.flora.flora_linear
    op(*args)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(*args)
    for seed, ranks in ((9, [2, 8, 0, 1]), (10, [0, 0, 3, 8])):
        new = _inputs(16, 256, 128, ranks, seed=seed, dtype=torch.bfloat16)
        for dst, src in zip(args, new, strict=True):
            dst.copy_(src)
        graph.replay()
        torch.testing.assert_close(y, flora_linear_triton(*args))
