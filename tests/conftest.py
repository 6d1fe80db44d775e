"""Tiny models built from configs (never downloaded): a Llama teacher and a Qwen2 proxy sharing a vocabulary."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see antidistill/__init__.py

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 48
PAD = 0
EOS = 1


def tiny_teacher(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_proxy(seed: int = 1, vocab: int = VOCAB, attn: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def tiny_gpt2_proxy(seed: int = 3, vocab: int = VOCAB) -> GPT2LMHeadModel:
    """A proxy with learned absolute positions: unlike RoPE (which sees only relative offsets),
    it gives a different Δ̂ when a left-padded row's positions are not shifted back to 0."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=24, n_layer=2, n_head=4, n_positions=256, pad_token_id=PAD,
                     eos_token_id=EOS, bos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def random_grad(model, seed: int = 2, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random g. Like any g from compute_proxy_gradient, its embedding row for padding_idx is zero
    (nn.Embedding's backward skips that row, so reverse-mode references would disagree with FD/JVP)."""
    gen = torch.Generator().manual_seed(seed)
    g = {n: torch.randn(p.shape, generator=gen) * scale for n, p in model.named_parameters()}
    emb = model.get_input_embeddings()
    if emb.padding_idx is not None:
        g["model.embed_tokens.weight"][emb.padding_idx] = 0.0
    return g


def left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_prompts(lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def reference_delta(proxy, grad, eps, tokens: list[int], difference="central") -> torch.Tensor:
    """Brute force: separate θ±εg models, no cache, no padding, full recompute. Returns (V,) float64-free fp32."""
    def shifted(scale):
        m = copy.deepcopy(proxy)
        for n, p in m.named_parameters():
            p.copy_(p.float() + scale * grad[n].float())
        return m
    ids = torch.tensor([tokens])
    if difference == "jvp":
        return brute_force_directional_derivative(proxy, grad, tokens)
    lp_plus = torch.log_softmax(shifted(eps)(ids).logits[0, -1].float(), -1)
    if difference == "central":
        return (lp_plus - torch.log_softmax(shifted(-eps)(ids).logits[0, -1].float(), -1)) / (2 * eps)
    return (lp_plus - torch.log_softmax(proxy(ids).logits[0, -1].float(), -1)) / eps


def brute_force_directional_derivative(proxy, grad, tokens: list[int]) -> torch.Tensor:
    """⟨∇θ log p(x), g⟩ for every x, one reverse-mode backward pass per vocabulary entry."""
    with torch.enable_grad():
        logp = torch.log_softmax(proxy(torch.tensor([tokens])).logits[0, -1].float(), -1)
        params = [p for _, p in proxy.named_parameters()]
        gs = [grad[n] for n, _ in proxy.named_parameters()]
        out = []
        for x in range(logp.numel()):
            grads = torch.autograd.grad(logp[x], params, retain_graph=True, allow_unused=True)
            out.append(sum((gr * g).sum() for gr, g in zip(grads, gs) if gr is not None))
    return torch.stack(out).detach()


@torch.no_grad()
def reference_eq11(teacher, proxy, grad, eps, lam, tau, tokens, difference="central") -> torch.Tensor:
    """(V,) probabilities of eq. 11, brute force."""
    logp_t = torch.log_softmax(teacher(torch.tensor([tokens])).logits[0, -1].float(), -1)
    delta = reference_delta(proxy, grad, eps, tokens, difference)
    return torch.softmax(logp_t / tau + lam * delta, -1)


@pytest.fixture(scope="session")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="session")
def proxy():
    return tiny_proxy()


@pytest.fixture(scope="session")
def grad(proxy):
    return random_grad(proxy)


@pytest.fixture(scope="session")
def vllm_world(tmp_path_factory):
    """The vLLM tests' tiny teacher, proxy and g, saved once: (paths, tokenizer, teacher, proxy, g)."""
    from vllm_helpers import require_vllm_or_skip, save_tiny_models

    require_vllm_or_skip()
    return save_tiny_models(tmp_path_factory.mktemp("vllm-world"))
