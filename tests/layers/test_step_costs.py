"""What adapter mode costs every step, removed without changing a result: the vectorized
`convert_mapping` gives vLLM's tensors exactly, and the host-side tokens-per-slot summary
matches the device indices."""

from __future__ import annotations

import random

import pytest
import torch

from flora_vllm.hooks import worker_step

pytestmark = pytest.mark.line  # also run on the other vLLM line (`make test-line`)


def _stock():
    from vllm.lora.punica_wrapper import utils

    return utils.convert_mapping  # the module's own name: the plugin patches punica_base's


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_convert_mapping_equals_stock(seed):
    from vllm.lora.layers import LoRAMapping

    rng = random.Random(seed)
    slots = 8
    ids = rng.sample(range(1, 500), rng.randint(0, slots))
    lora_index_to_id = ids + [None] * (slots - len(ids))
    rng.shuffle(lora_index_to_id)
    n_tok = rng.choice([0, 1, 7, 64, 300])
    pool = [0, *ids]
    tokens = [rng.choice(pool) for _ in range(n_tok)]
    prompt = [rng.choice(pool) for _ in range(rng.randint(0, max(1, n_tok // 4)))]
    mapping = LoRAMapping(tuple(tokens), tuple(prompt), is_prefill=True)
    cpu = torch.device("cpu")
    expected = _stock()(mapping, lora_index_to_id, slots + 1, 8192, cpu)
    got = worker_step.convert_mapping(mapping, lora_index_to_id, slots + 1, 8192, cpu)
    for e, g in zip(expected[:4], got[:4], strict=True):
        assert e.dtype == g.dtype and torch.equal(e, g)
    assert list(expected[4]) == list(got[4])


def test_vectorized_convert_mapping_refuses_an_unknown_id_like_stock():
    from vllm.lora.layers import LoRAMapping

    mapping = LoRAMapping((0, 7), (7,), is_prefill=True)
    with pytest.raises(KeyError):
        _stock()(mapping, [3, None], 3, 100, torch.device("cpu"))
    with pytest.raises(KeyError):
        worker_step.convert_mapping(mapping, [3, None], 3, 100, torch.device("cpu"))


def test_step_summary_counts_tokens_per_slot():
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    stock = getattr(PunicaWrapperCPU.update_metadata, "__wrapped__", None)
    update = worker_step._wrap_update_metadata(stock or PunicaWrapperCPU.update_metadata)
    mapping = LoRAMapping((5, 5, 0, 9, 5), (5, 0, 9), is_prefill=True)
    update(wrapper, mapping, [9, None, 5], 4, 100)
    n, counts = wrapper.flora_step
    assert n == 5 and counts[:4] == [1, 1, 0, 3]  # none, slot 0 (id 9), slot 1, slot 2 (id 5)
    assert wrapper.token_lora_indices.tolist() == [2, 2, -1, 0, 2]


def test_lm_head_lora_runs_only_while_a_slot_has_lm_head_weights():
    """The plain logits while no slot holds lm_head weights; vLLM's LoRA logits otherwise."""

    class Head:
        def __init__(self) -> None:
            self.base_layer = self  # the plain LogitsProcessor's _get_logits below

        def set_lora(self, index, lora_a, lora_b):
            self.reset_lora(index)  # as vLLM's set_lora does

        def reset_lora(self, index):
            pass

        def _get_logits(self, hidden, lm_head, *rest):
            return ("plain", lm_head)

    calls = []
    set_lora = worker_step._wrap_set_lora_weighted(Head.set_lora)
    reset_lora = worker_step._wrap_reset_lora_weighted(Head.reset_lora)
    Head.reset_lora = reset_lora
    get_logits = worker_step._wrap_logits_get_logits(lambda *a: calls.append(a) or "lora")
    head, lm_head = Head(), type("Wrapped", (), {"base_layer": "embedding"})()
    assert get_logits(head, "h", lm_head) == ("plain", "embedding")  # unwrapped lm_head
    set_lora(head, 1, "a", "b")
    assert get_logits(head, "h", lm_head) == "lora" and len(calls) == 1
    reset_lora(head, 1)
    assert get_logits(head, "h", lm_head) == ("plain", "embedding")


def test_embedding_lora_runs_only_while_a_slot_has_embedding_weights():
    """The plain embedding while no slot holds embedding weights; vLLM's LoRA embedding
    otherwise; while dynamo traces, one opaque node (which runs this same routing eagerly)."""
    from flora_vllm.ops import opaque

    class Embedding:
        base_layer = type("Base", (), {"forward": staticmethod(lambda ids: ("plain", ids))})

        def set_lora(self, index, *weights):
            pass

        def reset_lora(self, index):
            pass

    calls = []
    forward = worker_step._wrap_embedding_forward(lambda self, ids: calls.append(ids) or "lora")
    set_lora = worker_step._wrap_set_lora_weighted(Embedding.set_lora)
    reset_lora = worker_step._wrap_reset_lora_weighted(Embedding.reset_lora)
    emb = Embedding()
    assert forward(emb, "ids") == ("plain", "ids") and not calls
    set_lora(emb, 0, "a", "b")
    assert forward(emb, "ids") == "lora" and calls == ["ids"]
    reset_lora(emb, 0)
    assert forward(emb, "ids") == ("plain", "ids")

    emb._flora_key = "test:embedding"
    seen = []
    opaque.register(emb._flora_key, lambda ids, _: seen.append("eager") or ids.float(),
                    lambda ids: torch.empty(*ids.shape, dtype=torch.float32))
    ids = torch.tensor([1, 2])
    fn = torch.compile(lambda t: forward(emb, t) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(ids), ids.float() * 2) and seen == ["eager"]


class _Routed:
    """A FLoRA layer stand-in that records which path each pass takes (no vLLM layer needed)."""

    output_slices = (4,)

    def __init__(
        self, flora_slots: set[int], counts: list[int] | None, keep_lora: frozenset = frozenset()
    ) -> None:
        self._flora_slots = flora_slots
        self._keep_lora_slots = set(keep_lora)  # DoRA slots: their LoRA part applies too
        self._lora_slots = {1} | set(keep_lora)  # slots vLLM gave LoRA weights here (set_lora)
        self._bias_slots: set[int] = set()  # no slot scales the bias (IA3 on biased modules)
        self._bias_delta = None  # the layer has no bias
        self._counts = counts  # None: step_counts must not be read
        self.calls: list[str] = []
        layer = self

        class Method:
            def apply(self, base_layer, x, bias):
                layer.calls.append("base")
                return x.new_zeros(x.shape[0], 4)

        self.base_layer = type("Base", (), {"quant_method": Method()})()

    def step_counts(self, n_tok: int) -> list[int]:
        assert self._counts is not None, "read host-side counts inside a graph"
        return self._counts

    def _apply_fused(self, x2, bias):
        self.calls.append("fused")
        return x2.new_zeros(x2.shape[0], 4)

    def _apply_torch(self, x2, bias, counts, present):
        self.calls.append("torch")
        return x2.new_zeros(x2.shape[0], 4)

    def _apply_lora_to_output(self, x2, output):
        self.calls.append("lora")
        return output


@pytest.mark.parametrize(
    ("fused", "in_graph", "counts", "expected"),
    [
        (True, False, [3, 0, 0], ["base"]),  # no adapter token: vLLM's base GEMM, no LoRA op
        (True, False, [1, 0, 2], ["base", "lora"]),  # LoRA tokens only: base + punica
        (True, False, [1, 2, 0], ["fused"]),  # FLoRA tokens: the fused kernel
        (True, False, [0, 1, 2], ["fused", "lora"]),  # both kinds
        (True, True, None, ["fused", "lora"]),  # captured/traced: no host-side branch at all
        (False, False, [3, 0, 0], ["base"]),
        (False, False, [1, 2, 0], ["torch"]),
        # slot 2 holds an adapter with no weights at this layer (IA3 on k/v/down, here o_proj):
        # its tokens get the base output and no punica op
        (False, False, [1, 0, 0, 2], ["base"]),
        (True, False, [1, 0, 0, 2], ["base"]),
        (False, False, [0, 1, 1, 1], ["torch", "lora"]),
    ],
    ids=["plain", "lora-only", "flora", "mixed", "graph", "cpu-plain", "cpu-flora",
         "cpu-unweighted", "unweighted", "cpu-flora-lora-unweighted"],
)
def test_layer_routes_each_pass_to_its_work(monkeypatch, fused, in_graph, counts, expected):
    from flora_vllm.layers import base as layers

    monkeypatch.setattr(layers, "_runs_fused", lambda x: fused)
    monkeypatch.setattr(layers, "_in_graph", lambda x: in_graph)
    layer = _Routed({0}, counts)  # slot 0 holds a FLoRA adapter, slot 1 a LoRA one
    out = layers.FLoRALinearMixin.apply(layer, torch.zeros(3, 8))
    assert layer.calls == expected and out.shape == (3, 4)


@pytest.mark.parametrize(("fused", "expected"), [(True, ["fused", "lora"]),
                                                 (False, ["torch", "lora"])])
def test_a_dora_slot_alone_runs_its_scalings_and_its_lora(monkeypatch, fused, expected):
    """Slot 0 holds a DoRA adapter (FLoRA output scalings and LoRA weights, `keep_lora`): a pass
    with only its tokens runs both parts; a FLoRA slot's tokens alone skip the LoRA op."""
    from flora_vllm.layers import base as layers

    monkeypatch.setattr(layers, "_runs_fused", lambda x: fused)
    monkeypatch.setattr(layers, "_in_graph", lambda x: False)
    layer = _Routed({0}, [1, 2, 0], keep_lora=frozenset({0}))
    layers.FLoRALinearMixin.apply(layer, torch.zeros(3, 8))
    assert layer.calls == expected


class _Manager:
    """The worker's LoRA model manager, as `LRUCacheWorkerLoRAManager.add_adapter` uses it."""

    def __init__(self, held: list[int]) -> None:
        self._registered_adapters = dict.fromkeys(held, "model")
        self.calls: list[tuple] = []

    def list_adapters(self) -> dict:
        self.calls.append(("list_adapters",))
        return dict(self._registered_adapters)

    def get_adapter(self, lora_id: int):
        self.calls.append(("get_adapter", lora_id))
        return self._registered_adapters.get(lora_id)

    def activate_adapter(self, lora_id: int) -> bool:
        self.calls.append(("activate_adapter", lora_id))
        return True


@pytest.mark.parametrize("inplace", [False, True])
def test_held_adapter_is_touched_and_activated_without_listing_every_adapter(inplace):
    """A step's adapter the worker holds: the same calls and answer as stock vLLM, minus the
    copy of every registered id; a new one or a reload takes vLLM's own (loading) path."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    from flora_vllm.hooks import worker_adapters

    stock = LRUCacheWorkerLoRAManager.add_adapter
    stock = getattr(stock, "__wrapped__", stock)
    loads: list[int] = []

    class Worker:
        list_adapters = WorkerLoRAManager.list_adapters

        def __init__(self) -> None:
            self._adapter_manager = _Manager(held=list(range(1, 257)))

        def _load_adapter(self, request):
            loads.append(request.lora_int_id)
            raise RuntimeError("stop: the loading path")

    hooked = worker_adapters._wrap_lru_add_adapter(stock)
    held = LoRARequest("t7", 7, "/x", load_inplace=inplace)
    ours, theirs = Worker(), Worker()
    if inplace:  # a reload: vLLM's path, which loads the folder again
        with pytest.raises(RuntimeError, match="loading path"):
            hooked(ours, held)
        assert loads == [7]
        return
    assert hooked(ours, held) is stock(theirs, held) is True
    assert ours._adapter_manager.calls == [("get_adapter", 7), ("activate_adapter", 7)]
    assert theirs._adapter_manager.calls == [("list_adapters",), *ours._adapter_manager.calls]
    with pytest.raises(RuntimeError, match="loading path"):  # not held: vLLM loads it
        hooked(ours, LoRARequest("new", 999, "/y"))
    assert loads == [999]
