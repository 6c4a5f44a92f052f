"""PEFT IA3 folders as rank-1 FLoRA factors (`adapter.ia3`), checked against PEFT's own IA3
layers on a tiny model; and every problem of a broken IA3 folder named at once."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flora_vllm.adapter import FLoRAAdapterError
from flora_vllm.adapter.ia3 import load_ia3
from flora_vllm.testing.tiny import (
    LLAMA_TARGETS,
    build_llama,
    build_llama_family,
    linear_shapes,
    make_ia3_adapter,
)

TARGETS, FEEDFORWARD = ("k_proj", "v_proj", "down_proj", "up_proj"), ("down_proj", "up_proj")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ia3")
    base = build_llama(str(root / "model"))
    return base, make_ia3_adapter(base, str(root / "ia3"), TARGETS, FEEDFORWARD, seed=5)


def test_factors_equal_peft_ia3_layers(llama):
    """Every module: b ∘ (W0 (a ∘ x)) from the loaded factors equals PEFT's IA3 layer output
    (scaled input for feed-forward targets, scaled output otherwise); untargeted modules get
    no factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, folder = llama
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    shapes = linear_shapes(model, LLAMA_TARGETS)
    weights = load_ia3(folder, shapes)
    assert {p.rsplit(".", 1)[-1] for p in weights} == set(TARGETS)
    peft = PeftModel.from_pretrained(model, folder).eval()
    modules = dict(peft.base_model.model.named_modules())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, max(i for _, i in shapes.values()), generator=gen)
    moved = 0.0
    for path, w in weights.items():
        layer = modules[path]
        xi = x[:, : layer.in_features]
        with torch.no_grad():
            want = layer(xi)
            w0 = layer.get_base_layer().weight
            got = (xi * w.a[0]) @ w0.T * w.b[:, 0]
            moved = max(moved, float((want - xi @ w0.T).abs().max()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        ff = path.endswith(FEEDFORWARD)
        assert bool((w.b == 1).all()) == ff and bool((w.a == 1).all()) != ff
    assert moved > 1e-3  # the perturbed vectors change outputs


def _broken(folder: str, tmp_path, edit) -> str:
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(os.path.join(folder, WEIGHTS))
    for name in os.listdir(folder):
        if name != WEIGHTS:
            (out / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    save_file(edit(dict(tensors)), str(out / WEIGHTS))
    return str(out)


def test_every_problem_is_named(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base, folder = llama
    model = AutoModelForCausalLM.from_pretrained(base)
    shapes = linear_shapes(model, TARGETS)  # o_proj is not among them: not wrapped here
    key = "base_model.model.model.layers.{}.{}.ia3_l"
    hidden = model.config.hidden_size

    def edit(t: dict) -> dict:
        t[key.format(0, "mlp.down_proj")] = torch.ones(1, 7)  # wrong length
        t[key.format(0, "self_attn.k_proj")][0, 0] = float("nan")
        del t[key.format(1, "mlp.up_proj")]
        t[key.format(0, "self_attn.o_proj")] = torch.ones(hidden, 1)
        return t

    with pytest.raises(FLoRAAdapterError) as e:
        load_ia3(_broken(folder, tmp_path, edit), shapes)
    text = str(e.value)
    assert "layers.0.mlp.down_proj.ia3_l has shape [1, 7], expected" in text
    assert "layers.0.self_attn.k_proj.ia3_l holds NaN" in text
    assert "'model.layers.1.mlp.up_proj' is targeted but its ia3_l vector is missing" in text
    assert "IA3 on module 'model.layers.0.self_attn.o_proj' is not served" in text
    assert "4 problem(s)" in text


def test_non_feedforward_target_with_a_bias_scales_the_bias(tmp_path):
    """Qwen2's k/v carry biases: PEFT's IA3 scales them too (l ∘ (W0 x + bias)); the factors
    carry `bias_scale = l` there, and b ∘ (W0 (a ∘ x)) + bias_scale ∘ bias equals PEFT's layer.
    Feed-forward targets keep their bias unscaled (no bias_scale)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_llama_family(str(tmp_path / "qwen2"), "qwen2")
    folder = make_ia3_adapter(base, str(tmp_path / "ia3"), TARGETS, FEEDFORWARD, seed=6)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    shapes = linear_shapes(model, LLAMA_TARGETS)
    biased = {p for p, m in model.named_modules() if p in shapes and m.bias is not None}
    assert any("k_proj" in p for p in biased)
    weights = load_ia3(folder, shapes, biased)
    scaled = {p for p, w in weights.items() if w.bias_scale is not None}
    assert scaled and scaled == {p for p in weights if p in biased and "_proj" in p} - {
        p for p in weights if p.endswith(FEEDFORWARD)
    }
    modules = dict(PeftModel.from_pretrained(model, folder).eval().base_model.model.named_modules())
    x = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for path in scaled:
        layer, w = modules[path], weights[path]
        base_layer = layer.get_base_layer()
        with torch.no_grad():
            want = layer(x)
            got = (x * w.a[0]) @ base_layer.weight.T * w.b[:, 0] + w.bias_scale * base_layer.bias
            unscaled = got - (w.bias_scale - 1) * base_layer.bias
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert float((unscaled - want).abs().max()) > 1e-4  # the bias scaling matters here


def test_config_options_not_served_are_named(llama, tmp_path):
    _, folder = llama
    broken = _broken(folder, tmp_path, lambda t: t)
    cfg_path = os.path.join(broken, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["modules_to_save"] = ["lm_head"]
    cfg["target_modules"] = 5
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(FLoRAAdapterError) as e:
        load_ia3(broken, {"model.layers.0.mlp.down_proj": (1, 1)})
    assert "modules_to_save" in str(e.value) and "`target_modules` must be" in str(e.value)
