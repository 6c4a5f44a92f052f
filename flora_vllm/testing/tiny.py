"""Tiny random LLaMA / StarCoder models, a tokenizer and FLoRA + LoRA adapters, all built locally.

Nothing can be downloaded from a hub here, so the demo and the tests build their models on the
fly: weights drawn with a fixed seed and a large init scale (so adapters visibly change the
output), head_dim 64 (vLLM's CPU attention rejects 16), and a byte-level BPE tokenizer trained
on a few lines of text.

Runs in: the test or benchmark process, before any server starts (no vLLM import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flora_vllm.adapter import save_adapter

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STARCODER_TARGETS = ("c_attn", "c_proj", "c_fc")

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "FLoRA gives every request its own low-rank adapter, applied to the frozen weight.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "Serving many users at once, each with their own fine-tuned adapter.",
    "import torch\nx = torch.randn(4, 4)\nprint(x @ x.T)\n",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class TinySpec:
    """Shape of a tiny model: small enough to start in seconds on 2 cores."""

    hidden: int = 256
    heads: int = 4  # head_dim 64
    kv_heads: int = 2  # LLaMA only: grouped-query attention, so q and k/v slices differ
    layers: int = 2
    intermediate: int = 512
    vocab: int = 512
    max_positions: int = 1024
    init_std: float = 0.08


def build_tokenizer(path: str, vocab: int) -> None:
    """Train a byte-level BPE on a few lines and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _init_(model: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def _llama_config_kwargs(spec: TinySpec) -> dict:
    """The config fields every tiny LLaMA-family model shares (LLaMA, Qwen2/3, Mistral)."""
    return dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def build_llama(path: str, spec: TinySpec | None = None, seed: int = 0) -> str:
    """Save a random LlamaForCausalLM + tokenizer under `path`; return `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    model = LlamaForCausalLM(LlamaConfig(**_llama_config_kwargs(spec)))
    _init_(model, spec.init_std, seed)
    model.save_pretrained(path)
    build_tokenizer(path, spec.vocab)
    return path


# LLaMA-family architectures the plugin serves with the same layers: Qwen2 adds q/k/v biases,
# Qwen3 q/k RMS norms, Mistral is LLaMA with its own name (and sliding-window support, off here).
LLAMA_FAMILY = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def build_llama_family(path: str, arch: str, spec: TinySpec | None = None, seed: int = 0) -> str:
    """Save a random Qwen2 / Qwen3 / Mistral causal LM (`LLAMA_FAMILY`) + tokenizer."""
    import transformers

    config_name, model_name = LLAMA_FAMILY[arch]
    spec = spec or TinySpec()
    cfg = getattr(transformers, config_name)(
        **_llama_config_kwargs(spec),
        head_dim=spec.hidden // spec.heads,
        sliding_window=None,
        use_sliding_window=False,
    )
    model = getattr(transformers, model_name)(cfg)
    _init_(model, spec.init_std, seed)
    model.save_pretrained(path)
    build_tokenizer(path, spec.vocab)
    return path


def build_starcoder(
    path: str, spec: TinySpec | None = None, seed: int = 0, multi_query: bool = True
) -> str:
    """Save a random GPTBigCodeForCausalLM (StarCoder's architecture) + tokenizer; StarCoder
    itself is multi-query (one k/v head), `multi_query=False` gives per-head k/v."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    spec = spec or TinySpec()
    cfg = GPTBigCodeConfig(
        vocab_size=spec.vocab,
        n_embd=spec.hidden,
        n_head=spec.heads,
        n_layer=spec.layers,
        n_inner=spec.intermediate,
        n_positions=spec.max_positions,
        multi_query=multi_query,
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="float32",
    )
    model = GPTBigCodeForCausalLM(cfg)
    _init_(model, spec.init_std, seed)
    model.save_pretrained(path)
    build_tokenizer(path, spec.vocab)
    return path


def linear_shapes(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """transformers module path -> (out, in) for every nn.Linear whose short name is a target."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def make_flora_adapter(
    model_dir: str,
    out_dir: str,
    rank: int,
    targets: tuple[str, ...],
    seed: int,
    spread: float = 0.25,
    flora_alpha: float = 1.0,
) -> str:
    """A random FLoRA adapter near identity: A, B = 1 + spread·N(0, 1) on every target module."""
    from transformers import AutoModelForCausalLM

    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(model_dir), targets)
    factors = _random_factors(shapes, rank, seed, spread)
    save_adapter(out_dir, factors, rank, flora_alpha, base_model_name_or_path=model_dir)
    return out_dir


def _random_factors(
    shapes: dict[str, tuple[int, int]], rank: int, seed: int, spread: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A, B = 1 + spread·N(0, 1) per module, drawn in module order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return {
        path: (1.0 + spread * torch.randn(rank, in_f, generator=gen),
               1.0 + spread * torch.randn(out_f, rank, generator=gen))
        for path, (out_f, in_f) in shapes.items()
    }


def make_tenant_adapters(
    model_dir: str, root: str, names: list[str], targets: tuple[str, ...], rank: int = 1,
    seed: int = 1000, spread: float = 0.25,
) -> dict[str, str]:
    """Many random FLoRA adapters (one per tenant) as `root/<name>`, the model read once;
    adapter i is what `make_flora_adapter` makes with seed `seed + i`."""
    from transformers import AutoModelForCausalLM

    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(model_dir), targets)
    paths = {}
    for i, name in enumerate(names):
        paths[name] = os.path.join(root, name)
        factors = _random_factors(shapes, rank, seed + i, spread)
        save_adapter(paths[name], factors, rank, base_model_name_or_path=model_dir)
    return paths


def make_lora_adapter(
    model_dir: str, out_dir: str, rank: int, targets: tuple[str, ...], seed: int
) -> str:
    """A random PEFT LoRA adapter (non-zero B) on `targets`, saved with PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_dora_adapter(
    model_dir: str, out_dir: str, rank: int, targets: tuple[str, ...], seed: int,
    **config: object,
) -> str:
    """A PEFT DoRA adapter (LoRA with `use_dora`) on `targets`, saved with PEFT itself: its own
    init (B = 0, magnitude = the base rows' norms) plus a seeded random B and a perturbed
    magnitude, so both parts change answers. `config`: more LoraConfig fields (`use_rslora`,
    `alpha_pattern`, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), use_dora=True, **config
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_ia3_adapter(
    model_dir: str, out_dir: str, targets: tuple[str, ...], feedforward: tuple[str, ...],
    seed: int,
) -> str:
    """A PEFT IA3 adapter on `targets` (`feedforward` among them scale inputs), saved with PEFT
    itself: its own init (all ones) times a seeded random perturbation, so it changes answers."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.mul_(1 + 0.5 * torch.randn_like(p))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_tenant_lora_adapters(
    model_dir: str, root: str, names: list[str], targets: tuple[str, ...], rank: int,
    seed: int = 2000,
) -> dict[str, str]:
    """Many random PEFT LoRA adapters as `root/<name>`: PEFT saves the first, the others are
    copies of its files with fresh random weights (the model is read once, not per adapter)."""
    import shutil

    from safetensors.torch import load_file, save_file

    first = make_lora_adapter(model_dir, os.path.join(root, names[0]), rank, targets, seed)
    weights_file = os.path.join(first, "adapter_model.safetensors")
    template = load_file(weights_file)
    paths = {names[0]: first}
    for i, name in enumerate(names[1:], 1):
        gen = torch.Generator().manual_seed(seed + i)
        paths[name] = os.path.join(root, name)
        shutil.copytree(first, paths[name], dirs_exist_ok=True)
        save_file(
            {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in template.items()},
            os.path.join(paths[name], "adapter_model.safetensors"),
        )
    return paths


def build_demo_set(root: str, arch: str = "llama") -> dict[str, str]:
    """A model plus FLoRA adapters of ranks 1, 2, 4, 8 and one LoRA; returns name -> path
    ("base" is the model folder)."""
    os.makedirs(root, exist_ok=True)
    model_dir = os.path.join(root, "model")
    if arch == "llama":
        build_llama(model_dir)
        targets = LLAMA_TARGETS
    elif arch in LLAMA_FAMILY:
        build_llama_family(model_dir, arch)
        targets = LLAMA_TARGETS
    elif arch in ("starcoder", "starcoder-mha"):
        build_starcoder(model_dir, multi_query=arch == "starcoder")
        targets = STARCODER_TARGETS
    else:
        raise ValueError(
            f"unknown arch {arch!r}: use 'llama', {', '.join(map(repr, LLAMA_FAMILY))}, "
            "'starcoder' or 'starcoder-mha'"
        )
    paths = {"base": model_dir}
    for i, r in enumerate((1, 2, 4, 8)):
        name = f"flora-r{r}"
        paths[name] = make_flora_adapter(model_dir, os.path.join(root, name), r, targets, 10 + i)
    paths["lora-r8"] = make_lora_adapter(model_dir, os.path.join(root, "lora-r8"), 8, targets, 99)
    return paths
