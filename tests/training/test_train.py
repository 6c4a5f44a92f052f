"""FLoRA training (`flora_vllm.training.train`): identity start, the per-example batched form
against a
dense per-example oracle, a loss that falls, and a saved folder that the dense reference, and
(slow test) vLLM's real server, read back to the training model's numbers."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from reference import load_reference, token_logprobs
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from flora_vllm.adapter import load_adapter
from flora_vllm.testing.tiny import _CORPUS, LLAMA_TARGETS, build_llama, linear_shapes
from flora_vllm.training.layer import (
    TrainableFLoRALinear,
    flora_layers,
    inject_flora,
    per_example_adapters,
    save,
    set_active_adapter,
)
from flora_vllm.training.train import encode, lm_loss, main, train

TEXTS = [line for line in _CORPUS for _ in range(2)]  # 14 short examples, each seen twice


def _load(model_dir: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _perturb_(model: torch.nn.Module, spread: float = 0.3, seed: int = 1) -> None:
    """Move every FLoRA factor away from identity so adapters differ from each other."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flora_layers(model).values():
            for p in (layer.flora_A, layer.flora_B):
                p.add_(spread * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_llama(str(tmp_path_factory.mktemp("train") / "model"))


@pytest.fixture(scope="module")
def trained(tiny_llama: str) -> tuple[torch.nn.Module, list[float], list[float]]:
    """A rank-2 FLoRA model on every LLaMA linear, 20 AdamW steps on TEXTS; also returns the
    per-example loss before and after training."""
    torch.manual_seed(0)
    model = _load(tiny_llama)
    inject_flora(model, LLAMA_TARGETS, r=2)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    batch = encode(tok, TEXTS, 64)
    with torch.no_grad():
        before = lm_loss(model, batch).item()
    res = train(model, tok, TEXTS, epochs=6, batch_size=4, max_length=64, progress=False)
    with torch.no_grad():
        after = lm_loss(model, batch).item()
    return model, res.losses, [before, after]


@pytest.mark.parametrize(("r", "alpha"), [(1, 1.0), (2, 1.0), (3, 2.0), (4, 16.0)])
def test_identity_init_is_base_layer(r, alpha):
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 24)
    x = torch.randn(3, 5, 48)
    layer = TrainableFLoRALinear(base, r=r, n_adapters=2, alpha=alpha)
    if r > 1:  # the ± perturbation that lets the components separate is really there
        assert not torch.equal(layer.flora_A[0, 0], layer.flora_A[0, 1])
    with torch.no_grad():
        want = base(x)
        assert torch.equal(layer.merged_weight(1), base.weight)
        assert torch.equal(layer(x), want)  # the merged form, bit for bit
        got = layer.forward_batched(x, torch.tensor([0, 1, -1]))
    if r == 1:
        assert torch.equal(got, want)
    else:  # r rows summed: rounding only
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_identity_init_is_base_model(tiny_llama):
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_llama)
    with torch.no_grad():
        want = model(ids).logits
        layers = inject_flora(model, LLAMA_TARGETS, r=4, n_adapters=2)
        assert len(layers) == 2 * len(LLAMA_TARGETS)
        got = model(ids).logits
        with per_example_adapters(model, torch.tensor([1, 0])):
            got_batched = model(ids).logits
    err = (got - want).abs().max().item()
    print(f"identity init, merged form: max |Δ logit| = {err:.3g}")
    assert torch.equal(got, want)
    torch.testing.assert_close(got_batched, want, rtol=0, atol=1e-4)


def test_batched_form_matches_dense_per_example():
    """Example i with adapter ids[i] equals x_i @ (W0 ∘ (alpha/r · B_i A_i))^T + bias, built in
    float64 from the factors; the gradients of the factors agree with the dense form's too."""
    torch.manual_seed(0)
    r, alpha, ids = 3, 2.0, torch.tensor([0, 2, 1, -1, 0])
    layer = TrainableFLoRALinear(torch.nn.Linear(40, 24), r=r, n_adapters=3, alpha=alpha)
    with torch.no_grad():
        layer.flora_A.copy_(1 + 0.3 * torch.randn_like(layer.flora_A))
        layer.flora_B.copy_(0.5 + 0.3 * torch.randn_like(layer.flora_B))
    x = torch.randn(5, 7, 40)
    w0, bias = layer.base.weight.double(), layer.base.bias.double()
    want = []
    for i, s in enumerate(ids.tolist()):
        w = (
            w0
            if s < 0
            else w0 * (alpha / r * layer.flora_B[s].double() @ layer.flora_A[s].double())
        )
        want.append(F.linear(x[i].double(), w, bias))
    got = layer.forward_batched(x, ids)
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=1e-5)

    g = torch.randn_like(got)
    (got * g).sum().backward()
    grads = layer.flora_A.grad.clone(), layer.flora_B.grad.clone()
    layer.zero_grad()
    dense = torch.stack(
        [
            x[i] @ layer.base.weight.T if s < 0 else F.linear(x[i], layer.merged_weight(s))
            for i, s in enumerate(ids.tolist())
        ]
    )
    (dense * g).sum().backward()
    torch.testing.assert_close(grads[0], layer.flora_A.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], layer.flora_B.grad, rtol=1e-4, atol=1e-4)


def test_batched_form_gradients_equal_merged_form_per_example_float64():
    """The batched form (the shared serving op `torch_ops.flora_linear`) is differentiable: in
    float64, its gradients w.r.t. flora_A and flora_B (and x) equal those of the merged form run
    one example at a time, for ranks 1 (the scaled-rows path) and 3 (the expanded rows)."""
    for r in (1, 3):
        torch.manual_seed(r)
        base = torch.nn.Linear(12, 8).double()
        layer = TrainableFLoRALinear(base, r=r, n_adapters=3, alpha=2.0)
        with torch.no_grad():
            layer.flora_A.copy_(1 + 0.3 * torch.randn_like(layer.flora_A))
            layer.flora_B.copy_(0.5 + 0.3 * torch.randn_like(layer.flora_B))
        ids = torch.tensor([2, -1, 0, 2, 1])
        x = torch.randn(5, 4, 12, dtype=torch.float64, requires_grad=True)
        g = torch.randn(5, 4, 8, dtype=torch.float64)

        (layer.forward_batched(x, ids) * g).sum().backward()
        batched = (layer.flora_A.grad.clone(), layer.flora_B.grad.clone(), x.grad.clone())
        layer.zero_grad()
        x.grad = None
        for i, s in enumerate(ids.tolist()):
            w = base.weight if s < 0 else layer.merged_weight(s)
            (F.linear(x[i], w, base.bias) * g[i]).sum().backward()
        merged = (layer.flora_A.grad, layer.flora_B.grad, x.grad)
        assert batched[0].abs().sum() > 0 and batched[1].abs().sum() > 0
        for got, want in zip(batched, merged, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mixed_batch_in_model_matches_one_adapter_at_a_time(tiny_llama):
    """Through the whole transformers model: rows with adapters 1, base, 0 in one batch equal
    each row run alone with its adapter merged."""
    ids = torch.randint(2, 500, (3, 20), generator=torch.Generator().manual_seed(1))
    model = _load(tiny_llama)
    inject_flora(model, LLAMA_TARGETS, r=2, n_adapters=2)
    base = _load(tiny_llama)
    _perturb_(model)
    adapters = [1, -1, 0]
    with torch.no_grad(), per_example_adapters(model, torch.tensor(adapters)):
        mixed = model(ids).logits
    for i, s in enumerate(adapters):
        with torch.no_grad():
            if s < 0:
                alone = base(ids[i : i + 1]).logits
            else:
                set_active_adapter(model, s)
                alone = model(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-4)
    assert (mixed[0] - mixed[2]).abs().max() > 0.1, "the two adapters should differ"


def test_training_reduces_loss_and_trains_only_flora(trained, tiny_llama):
    model, losses, (before, after) = trained
    print(f"loss on the training texts: {before:.4f} -> {after:.4f} ({len(losses)} steps)")
    assert len(losses) == 6 * 4  # 14 texts / batch 4 = 4 steps per epoch
    assert after < 0.8 * before
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.flora_[AB]$", n) for n in trainable)
    base = _load(tiny_llama)
    for path, layer in flora_layers(model).items():
        assert torch.equal(layer.base.weight, base.get_submodule(path).weight), path


def test_per_example_training_trains_each_adapter_on_its_own_texts(tiny_llama):
    """Two adapters trained in shared minibatches (per-example form): each one's loss falls on
    its own task more than on the other's."""
    torch.manual_seed(0)
    model = _load(tiny_llama)
    inject_flora(model, LLAMA_TARGETS, r=1, n_adapters=2)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tasks = [_CORPUS[:3], _CORPUS[3:6]]
    texts = [t for task in tasks for t in task for _ in range(2)]
    owner = [k for k, task in enumerate(tasks) for _ in task for _ in range(2)]

    def losses() -> list[list[float]]:  # [adapter][task]
        with torch.no_grad():
            return [
                [
                    lm_loss(model, encode(tok, task, 64), torch.full((len(task),), k)).item()
                    for task in tasks
                ]
                for k in range(2)
            ]

    before = losses()
    train(model, tok, texts, adapter_ids=owner, epochs=8, batch_size=4, progress=False)
    after = losses()
    for k in range(2):
        own, other = before[k][k] - after[k][k], before[k][1 - k] - after[k][1 - k]
        assert own > 0.3 and own > other, (k, before, after)


def test_save_reads_back_as_the_training_model(trained, tiny_llama, tmp_path):
    model, _, _ = trained
    out = save(model, str(tmp_path / "adapter"), base_model_name_or_path=tiny_llama)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "FLORA" and cfg["r"] == 2 and cfg["flora_alpha"] == 1.0
    assert sorted(cfg["target_modules"]) == sorted(LLAMA_TARGETS)
    load_adapter(out, linear_shapes(_load(tiny_llama), LLAMA_TARGETS), max_rank=8)  # valid

    ids = torch.randint(2, 500, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        got = load_reference(tiny_llama, out)(ids).logits
        moved = (want - _load(tiny_llama)(ids).logits).abs().max().item()
    err = (got - want).abs().max().item()
    print(f"saved adapter vs training model: max |Δ logit| = {err:.3g} (moved {moved:.3g})")
    assert err < 1e-4
    assert moved > 0.05, "training should have changed the model"


def test_cli_trains_and_saves(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _CORPUS))
    out = tmp_path / "cli-adapter"
    argv = [tiny_llama, str(data), "--output", str(out), "--rank", "2", "--alpha", "2"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--targets", "q_proj,v_proj", "down_proj"]
    assert main(argv) == 0
    cfg, weights = load_adapter(
        str(out), linear_shapes(_load(tiny_llama), LLAMA_TARGETS), max_rank=8
    )
    assert cfg.r == 2 and cfg.flora_alpha == 2.0
    assert sorted(cfg.target_modules) == ["down_proj", "q_proj", "v_proj"]
    assert len(weights) == 3 * 2  # 3 modules x 2 layers

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match='string "text"'):
        main([tiny_llama, str(bad), "--output", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"targets \['nope'\] match no nn.Linear"):
        main([tiny_llama, str(data), "--output", str(tmp_path / "x"), "--targets", "nope"])


@pytest.mark.slow
def test_trained_adapter_served_by_vllm(tiny_llama, tmp_path):
    """Train, save, serve with vLLM's real OpenAI server: served log-probs equal the training
    model's (the model object the optimizer just updated) to 1e-3."""
    from openai import OpenAI

    from flora_vllm.serving.server import ServerProcess, lora_modules_args

    torch.manual_seed(0)
    model = _load(tiny_llama)
    inject_flora(model, LLAMA_TARGETS, r=4)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    train(model, tok, TEXTS, epochs=4, batch_size=4, max_length=64, progress=False)
    out = save(model, str(tmp_path / "trained"), base_model_name_or_path=tiny_llama)
    base = _load(tiny_llama)

    rng = random.Random(0)
    prompts = [[rng.randrange(2, 500) for _ in range(n)] for n in (9, 23, 40)]
    prompts.append(tok(_CORPUS[0])["input_ids"])
    args = ["--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512"]
    args += ["--max-lora-rank", "8", "--max-loras", "1", "--seed", "0"]
    args += lora_modules_args({"trained": out})
    server = ServerProcess(
        tiny_llama, args=args, env={"HF_HUB_OFFLINE": "1"}, log_path=str(tmp_path / "server.log")
    )
    worst = moved = 0.0
    with server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
        for prompt in prompts:
            res = client.completions.create(
                model="trained",
                prompt=prompt,
                max_tokens=8,
                temperature=0,
                logprobs=1,
                extra_body={"return_tokens_as_token_ids": True},
            )
            lp = res.choices[0].logprobs
            toks = [int(re.fullmatch(r"token_id:(\d+)", t).group(1)) for t in lp.tokens]
            mine = token_logprobs(model, prompt, toks)
            worst = max(worst, *(abs(a - b) for a, b in zip(lp.token_logprobs, mine, strict=True)))
            moved = max(
                moved,
                *(
                    abs(a - b)
                    for a, b in zip(token_logprobs(base, prompt, toks), mine, strict=True)
                ),
            )
    print(f"served vs training model: max |Δ logprob| = {worst:.3g} (vs base model {moved:.3g})")
    assert worst < 1e-3
    assert moved > 0.05, "the trained adapter should change the log-probs"


def test_prompt_completion_examples_learn_only_the_completion(tiny_llama, tmp_path):
    """A (prompt, completion) pair is one text whose prompt positions carry no loss; a JSONL
    file gives such pairs; a model without an adapter is refused (it would train the base)."""
    from flora_vllm.training.train import load_texts

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt, completion = "def add(a, b):", "\n    return a + b\n"
    batch = encode(tok, [(prompt, completion), ("for i", " in range(10):")], 64)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    whole = tok(prompt + completion, add_special_tokens=False).input_ids
    assert batch["input_ids"][0, : len(whole)].tolist() == whole
    labels = batch["labels"][0]
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt : len(whole)] >= 0).all()
    with pytest.raises(ValueError, match="mixes"):
        encode(tok, ["plain text", (prompt, completion)], 64)

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n"
                    + json.dumps({"text": "plain"}) + "\n")
    assert load_texts(str(path)) == [(prompt, completion), "plain"]
    path.write_text(json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(ValueError, match='"prompt" and "completion"'):
        load_texts(str(path))

    model = _load(tiny_llama)
    with pytest.raises(ValueError, match="no adapter to train"):
        train(model, tok, [(prompt, completion)], max_steps=1, progress=False)
    inject_flora(model, LLAMA_TARGETS, r=1)
    res = train(model, tok, [(prompt, completion)] * 4, epochs=10, batch_size=4, lr=2e-2,
                progress=False)
    assert res.losses[-1] < res.losses[0]
