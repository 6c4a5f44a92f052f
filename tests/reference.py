"""The independent oracle: transformers running the dense model with an adapter merged in.

FLoRA is merged straight from the files as W0 ∘ ((flora_alpha / r) · B @ A), without any of
flora_vllm's loading code; LoRA is merged by PEFT's own `merge_and_unload`; IA3 and DoRA run
in PEFT's own unmerged layers (DoRA's norm computed as PEFT computes it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load_reference(model_dir: str, adapter_dir: str | None = None) -> torch.nn.Module:
    """The base model, or the base model with the adapter at `adapter_dir` merged in."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir is None:
        return model.eval()
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg["peft_type"] == "LORA" and not cfg.get("use_dora"):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    if cfg["peft_type"] in ("IA3", "LORA"):  # IA3, DoRA: PEFT's own forward, unmerged
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir).eval()
    assert cfg["peft_type"] == "FLORA", cfg
    _merge_flora(model, adapter_dir, cfg)
    return model.eval()


def _merge_flora(model: torch.nn.Module, adapter_dir: str, cfg: dict) -> None:
    """W0 <- W0 ∘ ((flora_alpha / r) · B @ A) for every module the FLoRA files name."""
    scale = cfg.get("flora_alpha", 1.0) / cfg["r"]
    tensors = load_file(os.path.join(adapter_dir, "flora_model.safetensors"))
    modules = dict(model.named_modules())
    merged = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".flora_A.weight"):
                continue
            path = key.removeprefix("base_model.model.").removesuffix(".flora_A.weight")
            b = tensors[key.replace("flora_A", "flora_B")]
            lin = modules[path]
            lin.weight.mul_(scale * (b.double() @ a.double()).to(lin.weight.dtype))
            merged += 1
    assert merged > 0


def flora_references(model_dir: str, adapter_dirs: list[str]) -> Iterator[torch.nn.Module]:
    """The dense model with each FLoRA adapter merged in, in turn: one model whose weights are
    merged, yielded, and restored (for hundreds of adapters, instead of a load each)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for adapter_dir in adapter_dirs:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            _merge_flora(model, adapter_dir, json.load(f))
        yield model
        model.load_state_dict(original)


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[i] | prompt + completion[:i]) under `model`, one float per token."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0].double()  # [L, V]
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt) - 1
    return [logp[start + i, tok].item() for i, tok in enumerate(completion)]


@torch.no_grad()
def greedy_problems(
    model: torch.nn.Module, prompt: list[int], tokens: list[int], logprobs: list[float],
    tol: float = 1e-3,
) -> list[str]:
    """Why a served greedy answer is not the reference's (empty: it is): each token must be the
    reference's most likely one, or within `tol` of it (a tie the two float paths may break
    either way), and carry the reference's log-probability to `tol`."""
    ids = torch.tensor([prompt + tokens])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    problems = []
    for i, (tok, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        row = logp[len(prompt) - 1 + i]
        if row.max() - row[tok] > tol:
            problems.append(f"token {i}: {tok} is {row.max() - row[tok]:.2e} below the best")
        if abs(row[tok] - lp) > tol:
            problems.append(f"token {i}: logprob {lp:.5f} vs reference {row[tok]:.5f}")
    return problems


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` (the reference's own continuation)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def ask_logprobs(client, model: str, prompt: list[int], max_tokens: int) -> tuple[list, list]:
    """Greedy completion of a token-id prompt through the OpenAI client: (token ids, logprobs).
    Token ids come back as "token_id:N" (`return_tokens_as_token_ids`): byte-level token strings
    do not map back to ids."""
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = out.choices[0].logprobs
    toks = [int(re.fullmatch(r"token_id:(\d+)", t).group(1)) for t in lp.tokens]
    return toks, list(lp.token_logprobs)
