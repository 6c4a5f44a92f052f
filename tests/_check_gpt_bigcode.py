"""Check flora_vllm.models.gpt_bigcode against transformers: base MQA, base MHA, and LoRA.

Run: /work/main/.venv/bin/python tests/_check_gpt_bigcode.py
Each case runs in its own subprocess (one in-process vLLM engine per process).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Load no vLLM general plugins (the installed flora plugin would swap in its own LoRA layers);
# run with VLLM_PLUGINS=flora to check the model under the plugin instead.
os.environ.setdefault("VLLM_PLUGINS", "")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 512
TOL = 1e-3
PROMPTS = [[5, 17, 300, 42, 8], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111], [7]]


def build_model(path: str, multi_query: bool, seed: int = 0) -> None:
    """Save a tiny random GPTBigCode (+ a WordLevel tokenizer) with non-uniform outputs."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = GPTBigCodeConfig(
        vocab_size=VOCAB,
        n_positions=512,
        n_embd=256,
        n_layer=2,
        n_head=4,  # head_dim 64: vLLM's CPU attention rejects head_dim 16
        n_inner=512,
        multi_query=multi_query,
        activation_function="gelu_pytorch_tanh",
        bos_token_id=0,
        eos_token_id=1,
    )
    model = GPTBigCodeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("weight"):  # LayerNorm gains
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t0", eos_token="t1", unk_token="t2"
    ).save_pretrained(path)


def build_lora(base_path: str, lora_path: str, seed: int = 1) -> str:
    """Save a PEFT adapter on c_attn/c_proj/c_fc with non-zero B; return the merged model path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPTBigCodeForCausalLM

    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(lora_path)
    merged_path = lora_path + "_merged"
    peft_model.merge_and_unload().save_pretrained(merged_path)
    return merged_path


def hf_logprobs(path: str, prompts: list[list[int]], gens: list[list[int]]):
    """Log-probs (and greedy ids) transformers gives at each generated position."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    lps, argmaxes = [], []
    with torch.no_grad():
        for prompt, gen in zip(prompts, gens, strict=True):
            full = torch.tensor([prompt + gen])
            logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(gen))
            lps.append(logp[pos, torch.tensor(gen)].tolist())
            argmaxes.append(logp[pos].argmax(-1).tolist())
    return lps, argmaxes


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def run_case(multi_query: bool, out_json: str) -> None:
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    ModelRegistry.register_model(
        "GPTBigCodeForCausalLM", "flora_vllm.models.gpt_bigcode:GPTBigCodeForCausalLM"
    )
    tmp = tempfile.mkdtemp(prefix="gpt_bigcode_check_")
    base_path, lora_path = os.path.join(tmp, "base"), os.path.join(tmp, "lora")
    build_model(base_path, multi_query)
    merged_path = build_lora(base_path, lora_path)

    llm = LLM(
        model=base_path,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=256,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
    )

    def describe(m) -> dict:
        from vllm.lora.layers import BaseLayerWithLoRA, QKVParallelLinearWithLoRA

        blk = m.transformer.h[0]
        layers = {
            "c_attn": blk.attn.c_attn,
            "attn.c_proj": blk.attn.c_proj,
            "mlp.c_fc": blk.mlp.c_fc,
            "mlp.c_proj": blk.mlp.c_proj,
        }
        return {
            "model": f"{type(m).__module__}.{type(m).__name__}",
            **{k: type(v).__name__ for k, v in layers.items()},
            "c_attn_is_qkv_lora": isinstance(blk.attn.c_attn, QKVParallelLinearWithLoRA),
            "all_lora": all(isinstance(v, BaseLayerWithLoRA) for v in layers.values()),
        }

    modules = llm.apply_model(describe)[0]
    print("vLLM model / LoRA wrappers:", modules, flush=True)
    assert modules["model"] == "flora_vllm.models.gpt_bigcode.GPTBigCodeForCausalLM", modules
    assert modules["c_attn_is_qkv_lora"] and modules["all_lora"], modules

    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]

    def generate(lora: LoRARequest | None) -> tuple[list[list[int]], list[list[float]]]:
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        lps = [
            [step[t].logprob for step, t in zip(o.outputs[0].logprobs, i, strict=True)]
            for o, i in zip(outs, ids, strict=True)
        ]
        return ids, lps

    result: dict = {"multi_query": multi_query, "modules": modules}
    for tag, lora, ref_path in [
        ("base", None, base_path),
        ("lora", LoRARequest("la", 1, lora_path), merged_path),
    ]:
        ids, lps = generate(lora)
        ref_lps, ref_ids = hf_logprobs(ref_path, PROMPTS, ids)
        result[tag] = {"ids": ids, "lps": lps, "ref_lps": ref_lps, "ref_argmax": ref_ids}
        result[tag]["max_diff"] = max_diff(lps, ref_lps)
        result[tag]["ids_match"] = ids == ref_ids
    with open(out_json, "w") as f:
        json.dump(result, f)


def main() -> None:
    summary = {}
    for name, mq in [("mqa", True), ("mha", False)]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out_json = f.name
        cmd = [sys.executable, __file__, "--case", name, out_json]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        with open(out_json) as f:
            res = json.load(f)
        assert res["multi_query"] == mq
        base, lora = res["base"], res["lora"]
        lora_vs_base = max_diff(lora["ref_lps"], base["ref_lps"])
        summary[name] = (base["max_diff"], lora["max_diff"], lora_vs_base)
        print(
            f"[{name}] base max|dlogprob| = {base['max_diff']:.2e} (ids match HF: "
            f"{base['ids_match']}); lora max|dlogprob| = {lora['max_diff']:.2e} (ids match HF: "
            f"{lora['ids_match']}); lora-vs-base (HF) = {lora_vs_base:.3f}, "
            f"tokens differ: {lora['ids'] != base['ids']}",
            flush=True,
        )
        assert base["max_diff"] < TOL and base["ids_match"], name
        assert lora["max_diff"] < TOL and lora["ids_match"], name
        assert lora_vs_base > 0.05 or lora["ids"] != base["ids"], "adapter had no visible effect"
    print("OK", summary)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        run_case(sys.argv[2] == "mqa", sys.argv[3])
    else:
        main()
