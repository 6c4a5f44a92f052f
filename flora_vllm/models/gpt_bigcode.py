"""Native vLLM 0.29 implementation of StarCoder's architecture (``GPTBigCodeForCausalLM``).

vLLM 0.29 serves it via the Transformers backend, where LoRA on the fused ``c_attn`` is dropped.

Runs in: the worker process (vLLM builds it from the plugin's ModelRegistry entry).
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from transformers import GPTBigCodeConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors


class GPTBigCodeAttention(nn.Module):
    """Causal self-attention with a fused ``c_attn`` (MQA: one shared K/V head)."""

    def __init__(
        self,
        config: GPTBigCodeConfig,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        total_num_heads = config.num_attention_heads
        tp_size = get_tensor_model_parallel_world_size()
        assert total_num_heads % tp_size == 0
        self.multi_query = config.multi_query
        if not self.multi_query and tp_size > 1:
            # HF's MHA c_attn rows are interleaved per head ([q_h|k_h|v_h] for each head h), which
            # QKVParallelLinear (and QKVParallelLinearWithLoRA) would shard as if [Q|K|V].
            raise NotImplementedError("GPTBigCode with multi_query=False needs tensor parallel 1")
        total_num_kv_heads = 1 if self.multi_query else total_num_heads
        self.head_dim = hidden_size // total_num_heads
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)  # MQA: K/V replicated
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0

        self.c_attn = QKVParallelLinear(
            hidden_size,
            self.head_dim,
            total_num_heads,
            total_num_kv_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_attn",
        )
        self.c_proj = RowParallelLinear(
            hidden_size,
            hidden_size,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)  # [T, q_size + 2 * kv_size]
        if self.multi_query:
            # MQA checkpoint layout is [Q | K | V], exactly QKVParallelLinear's.
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            # MHA checkpoint layout is per head: [T, num_heads, (q|k|v), head_dim].
            q, k, v = qkv.view(-1, self.num_heads, 3, self.head_dim).unbind(dim=2)
            q = q.reshape(-1, self.q_size)  # [T, num_heads * head_dim]
            k = k.reshape(-1, self.kv_size)
            v = v.reshape(-1, self.kv_size)
        attn_output = self.attn(q, k, v)  # [T, q_size]
        output, _ = self.c_proj(attn_output)  # [T, hidden]
        return output


class GPTBigCodeMLP(nn.Module):
    def __init__(
        self,
        intermediate_size: int,
        config: GPTBigCodeConfig,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.c_fc = ColumnParallelLinear(
            hidden_size,
            intermediate_size,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_fc",
        )
        self.c_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        # "gelu_pytorch_tanh" -> nn.GELU(approximate="tanh"), as transformers (except on ROCm).
        self.act = get_act_fn(config.activation_function)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.c_fc(hidden_states)  # [T, inner / tp]
        hidden_states = self.act(hidden_states)
        hidden_states, _ = self.c_proj(hidden_states)  # [T, hidden]
        return hidden_states


class GPTBigCodeBlock(nn.Module):
    def __init__(
        self,
        config: GPTBigCodeConfig,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        inner_dim = config.n_inner if config.n_inner is not None else 4 * hidden_size
        self.ln_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTBigCodeAttention(config, cache_config, quant_config, f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTBigCodeMLP(inner_dim, config, quant_config, f"{prefix}.mlp")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))  # [T, hidden]
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": 0,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class GPTBigCodeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        assert not config.add_cross_attention, "cross-attention is not supported"
        self.config = config
        pp_group = get_pp_group()

        if pp_group.is_first_rank or (config.tie_word_embeddings and pp_group.is_last_rank):
            self.wte = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=f"{prefix}.wte",
            )
        else:
            self.wte = PPMissingLayer()
        if pp_group.is_first_rank:
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.wpe = PPMissingLayer()
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: GPTBigCodeBlock(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.h",
        )
        if pp_group.is_last_rank:
            self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        else:
            self.ln_f = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)  # [T, hidden]
            hidden_states = inputs_embeds + self.wpe(positions)  # learned absolute positions
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]

        for layer in islice(self.h, self.start_layer, self.end_layer):
            hidden_states = layer(hidden_states)

        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.ln_f(hidden_states)  # [T, hidden]


class GPTBigCodeForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
    # c_attn is fused on disk (and in PEFT adapters): one LoRA slice -> QKVParallelLinearWithLoRA.
    packed_modules_mapping = {"c_attn": ["c_attn"]}
    embedding_modules: dict[str, str] = {}
    # Old checkpoints carry the causal-mask buffers; never drop "c_attn.bias".
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={".attn.bias": None, ".attn.masked_bias": None}
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.transformer = GPTBigCodeModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
        )
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)  # [T, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # c_attn arrives fused and goes through QKVParallelLinear.weight_loader with no shard id;
        # a tied "lm_head.weight" is skipped by the loader as an alias of "transformer.wte.weight".
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
