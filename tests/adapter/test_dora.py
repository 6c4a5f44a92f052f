"""PEFT DoRA folders (`adapter.dora`): the output scalings s and the plain-LoRA part, checked
against PEFT's own DoRA layers on a tiny model; and every problem of a broken DoRA folder named
at once."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from flora_vllm.adapter import DORA_KIND, FLoRAAdapterError, read_peft_type
from flora_vllm.adapter.dora import read_dora, write_plain_lora
from flora_vllm.testing.tiny import LLAMA_TARGETS, build_llama, make_dora_adapter

TARGETS = ("q_proj", "v_proj", "down_proj", "gate_proj")
WEIGHTS = "adapter_model.safetensors"
VARIANTS = {  # LoraConfig fields that change the scaling PEFT (and vLLM) use per module
    "plain": {},
    "rslora-patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 2},
                        "alpha_pattern": {"down_proj": 3.0}},
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("dora")
    base = build_llama(str(root / "model"))
    return base, {
        name: make_dora_adapter(base, str(root / name), 4, TARGETS, seed=9 + i, **cfg)
        for i, (name, cfg) in enumerate(VARIANTS.items())
    }


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {p: m.weight for p, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and p.rsplit(".", 1)[-1] in LLAMA_TARGETS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_served_form_equals_peft_dora_layers(llama, variant, tmp_path):
    """Every module, as the server computes it: s ∘ (W0 x) + (s ∘ B) A x · scaling, with s from
    `read_dora` and the scaling from vLLM's own PEFTHelper reading the plain-LoRA config (as
    vLLM's loader does), equals PEFT's DoRA layer output (rank_pattern, alpha_pattern and
    use_rslora included); the DoRA part moves outputs; the plain folder has no magnitudes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm.lora.peft_helper import PEFTHelper

    base, folders = llama
    folder = folders[variant]
    assert read_peft_type(folder) == DORA_KIND
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    dora = read_dora(folder, _base_weights(model))
    assert {p.rsplit(".", 1)[-1] for p in dora.scales} == set(TARGETS)
    plain = write_plain_lora(dora, str(tmp_path))
    assert read_peft_type(plain) == "LORA"
    assert not any("magnitude" in k for k in load_file(os.path.join(plain, WEIGHTS)))
    helper = PEFTHelper.from_local_dir(plain, None)
    helper.validate_legal(type("Cfg", (), {"max_lora_rank": 8})())  # vLLM takes it: no DoRA
    peft = PeftModel.from_pretrained(model, folder).eval()
    modules = dict(peft.base_model.model.named_modules())
    gen = torch.Generator().manual_seed(0)
    moved = 0.0
    for path, s in dora.scales.items():
        layer = modules[path]
        x = torch.randn(5, layer.in_features, generator=gen)
        key = f"base_model.model.{path}.lora_{{}}.weight"
        a, b = dora.lora_tensors[key.format("A")], dora.lora_tensors[key.format("B")]
        _, scaling = helper.get_rank_and_scaling(path)
        with torch.no_grad():
            want = layer(x)
            w0 = layer.get_base_layer().weight
            got = (x @ w0.T) * s + (x @ a.T) @ (b * s[:, None] * scaling).T
            moved = max(moved, float((want - x @ w0.T).abs().max()))
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5, msg=lambda m, p=path: f"{p}: {m}"
        )
    assert moved > 1e-2  # the perturbed B and magnitudes change outputs


def _broken(folder: str, tmp_path, edit=lambda t: t, **config: object) -> str:
    out = tmp_path / "broken"
    out.mkdir()
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    json.dump({**cfg, **config}, open(out / "adapter_config.json", "w"))
    save_file(edit(dict(load_file(os.path.join(folder, WEIGHTS)))), str(out / WEIGHTS))
    return str(out)


def test_every_problem_of_the_weights_is_named(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base, folders = llama
    model = AutoModelForCausalLM.from_pretrained(base)
    weights = _base_weights(model)
    key = "base_model.model.model.layers.{}.{}.lora_magnitude_vector"
    hidden = model.config.hidden_size

    def edit(t: dict) -> dict:
        t[key.format(0, "mlp.down_proj")] = torch.ones(7)  # wrong length
        t[key.format(0, "self_attn.q_proj")][3] = float("nan")
        del t[key.format(1, "mlp.gate_proj")]
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(4, 8)
        t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.ones(hidden, 4)
        t["base_model.model.lm_head.lora_A.weight"] = torch.ones(4, hidden)
        t["base_model.model.lm_head.lora_B.weight"] = torch.ones(8, 4)
        t["base_model.model.lm_head.lora_magnitude_vector"] = torch.ones(8)
        return t

    with pytest.raises(FLoRAAdapterError) as e:
        read_dora(_broken(folders["plain"], tmp_path, edit), weights)
    text = str(e.value)
    assert "layers.0.mlp.down_proj.lora_magnitude_vector has shape [7], expected 256" in text
    assert "layers.0.self_attn.q_proj.lora_magnitude_vector holds NaN" in text
    assert "'model.layers.1.mlp.gate_proj' has LoRA weights but its lora_magnitude_vector" in text
    assert "DoRA on embeddings ('model.embed_tokens') is not served" in text
    assert "DoRA on module 'lm_head' is not served" in text
    assert "5 problem(s)" in text


def test_a_zero_row_norm_is_refused(llama, tmp_path):
    """W0 + scaling·BA with a zero row: s would be inf (PEFT divides by zero too)."""
    from transformers import AutoModelForCausalLM

    base, folders = llama
    model = AutoModelForCausalLM.from_pretrained(base)
    weights = _base_weights(model)
    path = "model.layers.0.self_attn.v_proj"
    weights[path] = weights[path].clone()
    weights[path][2] = 0

    def zero_b(t: dict) -> dict:
        t[f"base_model.model.{path}.lora_B.weight"][2] = 0
        return t

    with pytest.raises(FLoRAAdapterError, match=f"{path}: m / .* is not finite"):
        read_dora(_broken(folders["plain"], tmp_path, zero_b), weights)


def test_config_options_not_served_are_named(llama, tmp_path):
    _, folders = llama
    broken = _broken(folders["plain"], tmp_path, fan_in_fan_out=True, lora_bias=True,
                     trainable_token_indices=[1, 2], velora_config={"rank": 2})
    with pytest.raises(FLoRAAdapterError) as e:
        read_dora(broken, {})
    text = str(e.value)
    for feature in ("fan_in_fan_out", "lora_bias", "trainable_token_indices", "velora_config"):
        assert feature in text
    assert "4 problem(s)" in text


# --- the worker's arrangement (`hooks.worker_adapters._load_dora`) ---------------------------


PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
          "o_proj": ("o_proj",), "down_proj": ("down_proj",)}


def _worker(model: torch.nn.Module, tp_size: int = 1) -> SimpleNamespace:
    """A worker LoRA manager as `_load_dora` reads it: each vLLM module (packed like vLLM's
    LLaMA) a FLoRA layer with its base weight, slices and TP size; no vLLM engine."""
    from flora_vllm.layers import FLoRALinearMixin

    class Layer(FLoRALinearMixin):
        def __init__(self, parts: list[torch.nn.Linear]) -> None:
            self.output_slices = tuple(p.out_features for p in parts)
            self.base_layer = SimpleNamespace(weight=torch.cat([p.weight for p in parts]))
            self.tp_size = tp_size
            self.shapes = [(p.out_features, p.in_features) for p in parts]

        def flora_full_shapes(self) -> list[tuple[int, int]]:
            return self.shapes

    hf = dict(model.named_modules())
    modules, packed = {}, {}
    for i in range(model.config.num_hidden_layers):
        for prefix, group in ((f"model.layers.{i}.self_attn", ("qkv_proj", "o_proj")),
                              (f"model.layers.{i}.mlp", ("gate_up_proj", "down_proj"))):
            for name in group:
                subs = [f"{prefix}.{s}" for s in PACKED[name]]
                modules[f"{prefix}.{name}"] = Layer([hf[s] for s in subs])
                if len(subs) > 1:
                    packed[f"{prefix}.{name}"] = subs
    manager = SimpleNamespace(modules=modules, packed_modules=packed, model=SimpleNamespace())
    return SimpleNamespace(_adapter_manager=manager)


def _vllm_loader(seen: list[str], skip: str = ""):
    """What vLLM's `WorkerLoRAManager._load_adapter` does with a folder (PEFTHelper, then
    `LoRAModel.from_local_checkpoint`), for a model without module `skip`; records the folder
    it was given."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    def orig(worker, request):
        seen.append(request.lora_path)
        helper = PEFTHelper.from_local_dir(request.lora_path, None)
        helper.validate_legal(SimpleNamespace(max_lora_rank=8))
        expected = {s for subs in PACKED.values() for s in subs} - {skip}
        return LoRAModel.from_local_checkpoint(
            request.lora_path, expected, helper, lora_model_id=request.lora_int_id,
            device="cpu", dtype=torch.float32,
        )

    return orig


def test_worker_scales_lora_rows_and_arranges_output_factors_per_slice(llama):
    """`_load_dora` on vLLM's own loader: it reads a plain-LoRA copy (deleted afterwards), each
    module's lora_b rows come back scaled by s (vLLM folds `scaling` later, when packing), and
    `flora` holds a = 1, b = s at the module's slice of its packed vLLM layer (None where not
    adapted); together they equal PEFT's DoRA layer (use_rslora, rank/alpha patterns)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    from flora_vllm.hooks.worker_adapters import _load_dora

    base, folders = llama
    folder = folders["rslora-patterns"]
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    worker, seen = _worker(model), []
    lora = _load_dora(worker, LoRARequest("d", 3, folder), folder, _vllm_loader(seen))
    assert seen and seen[0] != folder and not os.path.exists(seen[0])  # the copy is gone
    adapted = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")
    layers = range(model.config.num_hidden_layers)
    assert set(lora.flora) == {f"model.layers.{i}.{m}" for i in layers for m in adapted}
    a_qkv, b_qkv = lora.flora["model.layers.0.self_attn.qkv_proj"]
    assert a_qkv[1] is None and b_qkv[1] is None  # k_proj: not a target
    peft = PeftModel.from_pretrained(model, folder).eval()
    modules = dict(peft.base_model.model.named_modules())
    gen = torch.Generator().manual_seed(1)
    for name, (a_list, b_list) in lora.flora.items():
        subs = worker._adapter_manager.packed_modules.get(name, [name])
        for sub, a, b in zip(subs, a_list, b_list, strict=True):
            if a is None:
                continue
            layer, weights = modules[sub], lora.loras[sub]
            assert bool((a == 1).all()) and a.shape == (1, layer.in_features)
            x = torch.randn(4, layer.in_features, generator=gen)
            with torch.no_grad():
                w0 = layer.get_base_layer().weight
                got = (x @ w0.T) * b[:, 0] + (x @ weights.lora_a.T) @ (
                    weights.lora_b * weights.scaling).T
                torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


def _tp_worker(model: torch.nn.Module, rank: int) -> SimpleNamespace:
    """Rank `rank` of 2 as `_dora_tp` sees it: q, gate and up rows split in halves, k and v
    whole on both ranks (kv heads replicated, as when ranks outnumber them), o and down split
    by input columns; each layer's `slice_lora_b` / `slice_lora_a` select those rows and
    columns, and its base weight holds exactly them."""
    worker = _worker(model, tp_size=2)
    for name, layer in worker._adapter_manager.modules.items():
        row = name.endswith(("o_proj", "down_proj"))
        kinds = PACKED[name.rsplit(".", 1)[-1]]
        full = layer.base_layer.weight.split(layer.output_slices)
        rows = []
        for kind, w in zip(kinds, full, strict=True):
            n = w.shape[0]
            whole = row or kind in ("k_proj", "v_proj")
            rows.append(slice(None) if whole else slice(rank * n // 2, (rank + 1) * n // 2))
        cols = slice(rank * full[0].shape[1] // 2, (rank + 1) * full[0].shape[1] // 2)
        cols = cols if row else slice(None)
        shards = [w[r][:, cols] for w, r in zip(full, rows, strict=True)]
        layer.output_slices = tuple(w.shape[0] for w in shards)
        layer.base_layer = SimpleNamespace(weight=torch.cat(shards))
        if len(kinds) == 1:
            layer.slice_lora_b = lambda b, r=rows[0]: b[r]
            layer.slice_lora_a = lambda a, c=cols: a[:, c]
        else:
            layer.slice_lora_b = lambda bs, rs=rows: [
                None if b is None else b[r] for b, r in zip(bs, rs, strict=True)
            ]
            layer.slice_lora_a = lambda a_s: a_s  # column layers: whole inputs
    return worker


def test_worker_row_norms_under_tensor_parallelism_equal_whole_rows(llama, monkeypatch):
    """Two tensor-parallel ranks (threads; the group's sum meets at a barrier): each sums its
    shard's squares, the sum over ranks with replicated rows counted once gives every module
    the s of the whole weight; a rank that cannot read the folder makes both refuse, neither
    waits forever."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM

    from flora_vllm.adapter.dora import parse_dora
    from flora_vllm.hooks import worker_adapters as wa

    base, folders = llama
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    want = read_dora(folders["rslora-patterns"], _base_weights(model)).scales
    barrier, sums = threading.Barrier(2, timeout=60), {}
    calls = threading.local()

    def tp_sum(t: torch.Tensor) -> torch.Tensor:
        k = calls.n = getattr(calls, "n", 0) + 1
        sums.setdefault(k, []).append(t.clone())
        barrier.wait()
        t.copy_(sum(sums[k]))
        barrier.wait()
        return t

    monkeypatch.setattr(wa, "_tp_sum", tp_sum)

    def rank(r: int, folder: str, fail: bool = False):
        calls.n = 0
        worker = _tp_worker(model, r)
        shapes, where = wa.flora_module_index(worker._adapter_manager)

        def read():
            if fail:
                raise FLoRAAdapterError("x", ["this rank's read failed"])
            return parse_dora(folder, shapes)

        try:
            return wa._dora_tp("'d'", read, worker._adapter_manager, where, shapes).scales
        except FLoRAAdapterError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(rank, (0, 1), [folders["rslora-patterns"]] * 2))
    for scales in got:
        assert scales.keys() == want.keys()
        for path, s in want.items():
            torch.testing.assert_close(scales[path], s, rtol=1e-6, atol=1e-7)
    sums.clear()
    with ThreadPoolExecutor(2) as pool:
        errors = list(pool.map(rank, (0, 1), [folders["plain"]] * 2, (False, True)))
    assert "this rank's read failed" in str(errors[1])
    assert "another tensor-parallel worker could not read" in str(errors[0])


def test_vllm_refusals_of_the_lora_part_name_the_folder_not_the_copy(llama, tmp_path):
    """vLLM's own checks still apply to the LoRA part (its rank limit, its modules); the 400
    names the adapter's folder, never the temporary plain-LoRA copy."""
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    from flora_vllm.hooks.worker_adapters import _load_dora

    base, folders = llama
    worker, seen = _worker(AutoModelForCausalLM.from_pretrained(base)), []
    folder = _broken(folders["plain"], tmp_path, r=16)
    with pytest.raises(FLoRAAdapterError, match="greater than max_lora_rank 8") as e:
        _load_dora(worker, LoRARequest("d", 3, folder), folder, _vllm_loader(seen))
    assert seen and seen[0] not in str(e.value) and not os.path.exists(seen[0])
    folder = folders["plain"]
    with pytest.raises(FLoRAAdapterError, match="expected target modules") as e:
        _load_dora(worker, LoRARequest("d", 3, folder), folder, _vllm_loader(seen, "down_proj"))
    assert f"While loading {folder}," in str(e.value) and seen[1] not in str(e.value)
