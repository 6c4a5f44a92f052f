"""LoRA -> FLoRA conversion (`flora_vllm.training.convert`): a LoRA whose ΔW is exactly a rank-1
multiplicative change converts with ~0 error and gives the LoRA's logits; a random LoRA gets a
finite error in (0, 1] for every module; unsupported LoRA features are all listed at once."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from reference import load_reference
from transformers import AutoModelForCausalLM

from flora_vllm.adapter import load_adapter
from flora_vllm.testing.tiny import (
    LLAMA_TARGETS,
    TinySpec,
    build_llama,
    linear_shapes,
    make_lora_adapter,
)
from flora_vllm.training.convert import (
    REPORT_NAME,
    LoRAConversionError,
    convert_lora_to_flora,
    fit_flora,
    main,
)

# hidden 64 (one head of 64: vLLM's CPU attention needs head_dim 64): every ΔW has rank <= 64.
SPEC = TinySpec(hidden=64, heads=1, kv_heads=1, layers=2, intermediate=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LLaMA whose q_proj weights hold exact zeros and tiny values, which no FLoRA
    factor can change and the fit must give weight zero (no NaN, no blow-up)."""
    path = str(tmp_path_factory.mktemp("convert") / "model")
    build_llama(path, SPEC)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[0, :8] = 0.0
            layer.self_attn.q_proj.weight[1, :8] = 1e-30
    model.save_pretrained(path)
    return path


def _write_exact_lora(model_dir: str, out_dir: str, rslora: bool, seed: int = 0) -> dict:
    """A PEFT LoRA of full rank 64 whose ΔW = W0 ∘ (b a^T) − W0 for known b, a = 1 + 0.25·N(0,1):
    exactly a rank-1 FLoRA change. Returns module path -> (a [1, in], b [out, 1])."""
    from peft import LoraConfig, get_peft_model

    rank = 64
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    w0s = {
        p: model.get_submodule(p).weight.detach().double()
        for p in linear_shapes(model, LLAMA_TARGETS)
    }
    alpha = math.sqrt(rank) if rslora else rank  # PEFT scale 1 either way
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=list(LLAMA_TARGETS)
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    truth = {}
    with torch.no_grad():
        for path, w0 in w0s.items():
            out_f, in_f = w0.shape
            a = 1 + 0.25 * torch.randn(1, in_f, generator=gen, dtype=torch.float64)
            b = 1 + 0.25 * torch.randn(out_f, 1, generator=gen, dtype=torch.float64)
            delta = w0 * (b @ a) - w0
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # rank <= 64 = min(out, in)
            lora = peft_model.base_model.model.get_submodule(path)
            lora.lora_B["default"].weight.copy_(u * s.sqrt())
            lora.lora_A["default"].weight.copy_(s.sqrt().unsqueeze(1) * vh)
            truth[path] = (a, b)
    peft_model.save_pretrained(out_dir)
    return truth


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_exact_rank1_lora_converts_with_no_error(model_dir, tmp_path, rslora):
    lora_dir, flora_dir = str(tmp_path / "lora"), str(tmp_path / "flora")
    truth = _write_exact_lora(model_dir, lora_dir, rslora)
    report = convert_lora_to_flora(lora_dir, model_dir, flora_dir, rank=1, progress=False)
    print(
        f"exact rank-1 LoRA ({'rslora' if rslora else 'lora'}): overall {report.overall:.3g}, "
        f"worst module {max(report.modules.values()):.3g}"
    )
    assert sorted(report.modules) == sorted(truth)
    assert report.overall < 1e-3 and max(report.modules.values()) < 1e-3

    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(model_dir), LLAMA_TARGETS)
    cfg, weights = load_adapter(flora_dir, shapes, max_rank=8)  # a valid FLoRA folder
    assert cfg.r == 1 and set(weights) == set(truth)
    with open(os.path.join(flora_dir, REPORT_NAME)) as f:
        assert json.load(f)["overall_relative_error"] == report.overall

    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_reference(model_dir, lora_dir)(ids).logits
        got = load_reference(model_dir, flora_dir)(ids).logits
        base = load_reference(model_dir)(ids).logits
    print(
        f"logits: converted FLoRA vs LoRA {(got - want).abs().max():.3g}, "
        f"LoRA vs base {(want - base).abs().max():.3g}"
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert (want - base).abs().max() > 0.1, "the LoRA should change the model"


def test_random_lora_reports_every_module(model_dir, tmp_path):
    lora_dir = make_lora_adapter(model_dir, str(tmp_path / "lora"), 8, LLAMA_TARGETS, seed=3)
    modules = linear_shapes(AutoModelForCausalLM.from_pretrained(model_dir), LLAMA_TARGETS)
    overall = {}
    for rank in (1, 4):
        out = str(tmp_path / f"flora-r{rank}")
        report = convert_lora_to_flora(lora_dir, model_dir, out, rank=rank, progress=False)
        assert sorted(report.modules) == sorted(modules)  # every module, no silent drop
        errs = list(report.modules.values())
        assert all(math.isfinite(e) and 0 < e <= 1 + 1e-9 for e in errs), errs
        assert 0 < report.overall <= 1 + 1e-9
        assert all(p in report.table() for p in modules)
        cfg, _ = load_adapter(out, modules, max_rank=8)
        assert cfg.r == rank
        overall[rank] = report.overall
    print(f"random rank-8 LoRA -> FLoRA, overall relative error: {overall}")
    assert overall[4] < overall[1]


def test_fit_handles_zero_weights_and_exact_rank2():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    w0[:3, :] = 0.0  # whole rows of zeros: their B rows are free, any value is exact
    w0[5, :10] = 1e-40
    b = 1 + 0.5 * torch.randn(40, 2, generator=gen, dtype=torch.float64)
    a = 0.5 + 0.5 * torch.randn(2, 30, generator=gen, dtype=torch.float64)
    target = w0 * (b @ a)
    fa, fb, rel = fit_flora(w0, target, rank=2, iters=100)
    assert torch.isfinite(fa).all() and torch.isfinite(fb).all()
    assert rel < 1e-6
    _, _, rel1 = fit_flora(w0, target, rank=1, iters=100)
    assert 0 < rel1 < 1  # rank 1 cannot hold it, but beats dropping the adapter


def test_unsupported_lora_features_listed_at_once(model_dir, tmp_path):
    lora_dir = make_lora_adapter(model_dir, str(tmp_path / "lora"), 2, ("q_proj",), seed=0)
    path = os.path.join(lora_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(use_dora=True, bias="all", modules_to_save=["lm_head"])
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(LoRAConversionError, match=r"3 problem\(s\)") as err:
        convert_lora_to_flora(lora_dir, model_dir, str(tmp_path / "out"), progress=False)
    for word in ("DoRA", "bias='all'", "modules_to_save"):
        assert word in str(err.value)


def test_cli(model_dir, tmp_path, capsys):
    lora_dir = make_lora_adapter(model_dir, str(tmp_path / "lora"), 4, ("q_proj", "v_proj"), 1)
    out = str(tmp_path / "out")
    assert main([lora_dir, model_dir, "--output", out, "--rank", "2", "--iters", "5"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in text and "overall" in text
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 2 and cfg["flora_alpha"] == 2.0 and cfg["peft_type"] == "FLORA"
