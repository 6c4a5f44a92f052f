"""ops/opaque.py: a layer that branches on host state stays per-step correct inside a compiled
graph traced once (as vLLM's CPU platform compiles), because the graph holds one opaque node."""

from __future__ import annotations

import pytest
import torch

from flora_vllm.ops import opaque


class HostBranching(torch.nn.Module):
    """Doubles or negates its input depending on a Python flag set between steps (like the
    per-step slot counts of a FLoRA layer)."""

    def __init__(self, width: int, use_opaque: bool) -> None:
        super().__init__()
        self.double = True
        self.use_opaque = use_opaque
        self.key = opaque.register(
            f"test:{use_opaque}", lambda x, _: self.eager(x), opaque.linear_fake(width)
        )

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if self.double else -x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_opaque and torch.compiler.is_compiling():
            return opaque.call(self.key, x)
        return self.eager(x)


def _two_steps(use_opaque: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Compile once, flip the host flag, run again with recompilation forbidden (vLLM traces
    its model once and drops dynamo's guards: a branch traced into the graph is baked in)."""
    torch._dynamo.reset()
    layer = HostBranching(4, use_opaque)
    fn = torch.compile(lambda x: layer(torch.relu(x)) + 1, fullgraph=True, backend="aot_eager")
    x = torch.arange(-4.0, 4.0).reshape(2, 4)
    first = fn(x)
    layer.double = False  # the next step takes the other branch
    with torch.compiler.set_stance("fail_on_recompile"):
        return first, fn(x)


def test_opaque_layer_follows_host_state_without_recompiling():
    x = torch.arange(-4.0, 4.0).reshape(2, 4)
    first, second = _two_steps(use_opaque=True)
    assert torch.equal(first, torch.relu(x) * 2 + 1)
    assert torch.equal(second, -torch.relu(x) + 1)


def test_without_the_opaque_node_the_traced_branch_is_stale():
    """The control: traced into the graph, the branch needs a recompile, which a trace-once
    compile never does."""
    with pytest.raises(RuntimeError, match="recompil"):
        _two_steps(use_opaque=False)


def test_fake_gives_shape_and_dtype_for_tracing():
    torch._dynamo.reset()
    key = opaque.register("test:slice", lambda x, _: x[..., :3].clone(), opaque.linear_fake(3))
    fn = torch.compile(lambda x: opaque.call(key, x) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 7)
    assert torch.equal(fn(x), x[:, :3] * 2)
