"""The three toy model families, built from configs: teacher (Llama), proxy (Qwen2), student (GPT-2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSpec:
    family: str  # "llama" | "qwen2" | "gpt2"
    hidden: int
    layers: int
    heads: int
    intermediate: int


def build_model(spec: ModelSpec, tokenizer, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

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
    raise ValueError(f"unknown model family {spec.family!r}; use llama, qwen2 or gpt2")
