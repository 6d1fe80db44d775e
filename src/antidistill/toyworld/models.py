"""The toy model families, built from configs: teacher (Llama), proxy (Qwen2), student (GPT-2), and the
proxy zoo's and student panel's further families (GPT-NeoX, OPT)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ..settings import CONFIG


@dataclass(config=CONFIG)
class ModelSpec:
    family: Literal["llama", "qwen2", "gpt2", "gpt_neox", "opt"]
    hidden: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    intermediate: int = Field(ge=1)


def build_model(spec: ModelSpec, tokenizer, seed: int):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if spec.family == "llama":
        cfg = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                          num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                          max_position_embeddings=512, tie_word_embeddings=True, **common)
        return LlamaForCausalLM(cfg)
    if spec.family == "qwen2":
        cfg = Qwen2Config(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                          num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                          max_position_embeddings=512, tie_word_embeddings=True, **common)
        return Qwen2ForCausalLM(cfg)
    if spec.family == "gpt2":
        cfg = GPT2Config(n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads, n_inner=spec.intermediate,
                         n_positions=512, **common)
        return GPT2LMHeadModel(cfg)
    if spec.family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                            max_position_embeddings=512, tie_word_embeddings=True, **common)
        return GPTNeoXForCausalLM(cfg)
    if spec.family == "opt":
        cfg = OPTConfig(hidden_size=spec.hidden, ffn_dim=spec.intermediate, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, word_embed_proj_dim=spec.hidden,
                        max_position_embeddings=512, tie_word_embeddings=True, **common)
        return OPTForCausalLM(cfg)
    raise ValueError(f"unknown model family {spec.family!r}; use llama, qwen2, gpt2, gpt_neox or opt")
