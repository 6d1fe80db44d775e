"""Proxy-logit mixing (the product-of-experts baseline) against brute-force references, and the
norm-matched random direction."""

import pytest
import torch
from transformers import TopPLogitsWarper

import antidistill
from antidistill import ProxyMixLogitsProcessor, proxy_mix_logits, random_direction
from antidistill.gradient import grad_norm
from antidistill.mixing import ProxyLogits

from conftest import EOS, PAD, VOCAB, left_pad, random_grad, random_prompts, tiny_gpt2_proxy, tiny_proxy, tiny_teacher

GAMMA, TAU = 0.4, 0.8


def strip_left_pad(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[0] == PAD:
        ids = ids[1:]
    return ids


def generate(teacher, proc, inputs, seed=0, max_new_tokens=5, **kw):
    torch.manual_seed(seed)
    args = dict(top_k=0, top_p=1.0) | kw
    return antidistill.generate(teacher, **inputs, processor=proc, max_new_tokens=max_new_tokens, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS, **args)


@torch.no_grad()
def reference_mix(teacher, proxy, gamma, tau, tokens: list[int]) -> torch.Tensor:
    """(V,) probabilities ∝ p_T^((1−γ)/τ)·p_P^(γ/τ): both models on the whole unpadded sequence, no cache."""
    ids = torch.tensor([tokens])
    logp_t = torch.log_softmax(teacher(ids).logits[0, -1].double(), -1)
    logp_p = torch.log_softmax(proxy(ids).logits[0, -1].double(), -1)
    return torch.softmax(((1 - gamma) * logp_t + gamma * logp_p) / tau, -1).float()


# --- the pure function -----------------------------------------------------------------------------


def test_mixing_by_hand():
    t, p = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[3.0, 0.0, 0.0]])
    lt, lp = torch.log_softmax(t, -1), torch.log_softmax(p, -1)
    out = proxy_mix_logits(t + 5.0, p - 2.0, 0.25, 2.0)  # per-row shifts cancel
    torch.testing.assert_close(out, (0.75 * lt + 0.25 * lp) / 2.0)
    torch.testing.assert_close(proxy_mix_logits(t, p, 0.25, 2.0, times_tau=True), 0.75 * lt + 0.25 * lp)
    tau = torch.tensor([1.0, 4.0])
    rows = proxy_mix_logits(torch.cat([t, t]), torch.cat([p, p]), 0.25, tau)
    torch.testing.assert_close(rows, (0.75 * lt + 0.25 * lp) / tau[:, None])


def test_gamma_ends_are_the_teacher_and_the_proxy():
    gen = torch.Generator().manual_seed(0)
    t, p = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    assert torch.equal(proxy_mix_logits(t, None, 0.0, TAU), torch.log_softmax(t, -1) / TAU)
    assert torch.equal(proxy_mix_logits(t, p * float("nan"), 0.0, TAU), torch.log_softmax(t, -1) / TAU)
    torch.testing.assert_close(torch.softmax(proxy_mix_logits(t, p, 1.0, TAU), -1), torch.softmax(p / TAU, -1))


def test_a_ban_is_a_veto_at_any_weight():
    t = torch.tensor([[0.0, float("-inf"), 1.0]])
    p = torch.tensor([[float("-inf"), 0.0, 1.0]])
    for gamma in (0.0, 0.5, 1.0):
        out = proxy_mix_logits(t, p, gamma, 1.0)
        assert torch.isneginf(out[0, 1]) and not torch.isnan(out).any(), gamma
        if gamma > 0:
            assert torch.isneginf(out[0, 0])


@pytest.mark.parametrize("gamma, needle", [(-0.1, "gamma=-0.1"), (1.5, "gamma=1.5"), (float("nan"), "gamma=nan")])
def test_bad_gamma_is_refused(gamma, needle):
    with pytest.raises(ValueError, match=needle):
        proxy_mix_logits(torch.zeros(1, 3), torch.zeros(1, 3), gamma, 1.0)


def test_shape_and_missing_proxy_are_refused():
    with pytest.raises(ValueError, match=r"shape \(1, 3\) when gamma != 0 \(gamma=0.5\), got \(1, 4\)"):
        proxy_mix_logits(torch.zeros(1, 3), torch.zeros(1, 4), 0.5, 1.0)
    with pytest.raises(ValueError, match="got None"):
        proxy_mix_logits(torch.zeros(1, 3), None, 0.5, 1.0)
    with pytest.raises(ValueError, match="tau"):
        proxy_mix_logits(torch.zeros(1, 3), torch.zeros(1, 3), 0.5, 0.0)


# --- the processor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_processor_matches_brute_force_left_padded_over_several_steps(teacher, family):
    """Every decode step of every row, left padded, with the proxy's KV cache, equals both models run on
    the row's whole unpadded sequence; three batches through one processor (the cache resets)."""
    proxy = tiny_proxy() if family == "qwen2" else tiny_gpt2_proxy()
    proc = ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU)
    for call, lengths in enumerate([(3, 7, 5), (9, 4), (12, 2, 6)]):
        inputs = left_pad(random_prompts(lengths, seed=20 + call))
        out = generate(teacher, proc, inputs, seed=call, max_new_tokens=6)
        width = inputs["input_ids"].shape[1]
        for t, scores in enumerate(out.scores):
            for b in range(scores.shape[0]):
                ref = reference_mix(teacher, proxy, GAMMA, TAU, strip_left_pad(out.sequences[b, : width + t]))
                torch.testing.assert_close(torch.softmax(scores[b], -1), ref, atol=2e-5, rtol=1e-4,
                                           msg=f"call {call} step {t} row {b}")


def test_without_a_mask_leading_pads_are_padding(teacher):
    """A bare ``model.generate`` does not hand over the mask: leading pad ids are the padding."""
    proxy = tiny_gpt2_proxy()
    proc = ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU, pad_token_id=PAD)
    inputs = left_pad(random_prompts((3, 8), seed=2))
    torch.manual_seed(0)
    out = teacher.generate(**inputs, logits_processor=[proc], **proc.generate_kwargs(), max_new_tokens=4,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS)
    width = inputs["input_ids"].shape[1]
    for t, scores in enumerate(out.scores):
        for b in range(2):
            ref = reference_mix(teacher, proxy, GAMMA, TAU, strip_left_pad(out.sequences[b, : width + t]))
            torch.testing.assert_close(torch.softmax(scores[b], -1), ref, atol=2e-5, rtol=1e-4)


def test_gamma_zero_is_exactly_temperature_sampling(teacher, proxy):
    inputs = left_pad(random_prompts((3, 6), seed=1))
    a = generate(teacher, ProxyMixLogitsProcessor(proxy, gamma=0.0, tau=TAU), inputs, seed=123, max_new_tokens=8)
    torch.manual_seed(123)
    b = teacher.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=TAU, top_k=0, top_p=1.0,
                         pad_token_id=PAD, eos_token_id=EOS, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(sa, sb) for sa, sb in zip(a.scores, b.scores))


def test_gamma_one_is_the_proxys_distribution(teacher, proxy):
    inputs = left_pad(random_prompts((4, 7), seed=5))
    out = generate(teacher, ProxyMixLogitsProcessor(proxy, gamma=1.0, tau=TAU), inputs, max_new_tokens=4)
    width = inputs["input_ids"].shape[1]
    for t, scores in enumerate(out.scores):
        for b in range(2):
            tokens = strip_left_pad(out.sequences[b, : width + t])
            with torch.no_grad():
                ref = torch.softmax(proxy(torch.tensor([tokens])).logits[0, -1].float() / TAU, -1)
            torch.testing.assert_close(torch.softmax(scores[b], -1), ref, atol=2e-5, rtol=1e-4)


def test_top_p_applies_to_the_mixed_distribution(teacher, proxy):
    proc = ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU)
    inputs = left_pad(random_prompts((5, 8), seed=7))
    out = generate(teacher, proc, inputs, top_p=0.6)
    width, warper = inputs["input_ids"].shape[1], TopPLogitsWarper(0.6)
    for t, scores in enumerate(out.scores):
        for b in range(2):
            ref = warper(None, reference_mix(teacher, proxy, GAMMA, TAU,
                                             strip_left_pad(out.sequences[b, : width + t])).log()[None])[0]
            assert torch.equal(torch.isinf(scores[b]), torch.isinf(ref))
            torch.testing.assert_close(torch.softmax(scores[b], -1), torch.softmax(ref, -1), atol=2e-5, rtol=1e-4)


def test_narrower_proxy_gives_no_mass_to_the_teachers_extra_rows():
    """A teacher 8 rows wider than the proxy: the proxy gives those rows no mass (γ > 0 vetoes them)."""
    teacher, proxy = tiny_teacher(vocab=VOCAB + 8), tiny_proxy()
    proc = ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU, teacher_vocab_size=VOCAB + 8)
    inputs = left_pad(random_prompts((4, 6), seed=3))
    out = generate(teacher, proc, inputs, max_new_tokens=3)
    for scores in out.scores:
        assert torch.isneginf(scores[:, VOCAB:]).all() and torch.isfinite(scores[:, :VOCAB]).all()
    with pytest.raises(ValueError, match="teacher vocabulary size 56 differs"):
        ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU)(inputs["input_ids"], torch.zeros(2, VOCAB + 8))


def test_proxy_logits_cache_equals_recompute(proxy):
    cached, fresh = ProxyLogits(proxy, pad_token_id=PAD), ProxyLogits(proxy, pad_token_id=PAD)
    ids = left_pad(random_prompts((2, 9, 5), seed=4))["input_ids"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        fresh.reset()
        torch.testing.assert_close(cached(ids), fresh(ids), atol=1e-6, rtol=0)
        ids = torch.cat([ids, torch.randint(3, 40, (3, 1), generator=gen)], 1)


def test_non_finite_rows_are_refused_never_the_teacher(teacher):
    proxy = tiny_proxy()
    with torch.no_grad():
        proxy.lm_head.weight[5].fill_(float("nan"))  # tied: the proxy's logits are NaN for every row
    proc = ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU, eos_token_id=EOS)
    inputs = left_pad(random_prompts((3, 5), seed=1))
    with pytest.warns(RuntimeWarning, match="refused"):
        out = generate(teacher, proc, inputs, max_new_tokens=2)
    assert proc.n_refused_rows > 0
    assert (out.sequences[:, inputs["input_ids"].shape[1]] == EOS).all()


def test_processor_never_mutates_input_nor_the_proxy(proxy):
    before = {n: p.clone() for n, p in proxy.named_parameters()}
    train = tiny_proxy().train()
    for p in (proxy, train):
        proc = ProxyMixLogitsProcessor(p, gamma=GAMMA, tau=TAU)
        ids = torch.tensor([[PAD, 2, 5, 9], [2, 7, 8, 3]])
        scores = torch.randn(2, VOCAB)
        ids0, scores0 = ids.clone(), scores.clone()
        out = proc(ids, scores)
        assert torch.equal(ids, ids0) and torch.equal(scores, scores0) and out.data_ptr() != scores.data_ptr()
    assert train.training  # the caller's model keeps its mode
    for n, p in proxy.named_parameters():
        assert torch.equal(p, before[n]), n


def test_temperature_mismatch_is_an_error(teacher, proxy):
    proc = ProxyMixLogitsProcessor(proxy, gamma=GAMMA, tau=TAU)
    with pytest.raises(ValueError, match=r"temperature=0.5.*tau=0.8"):
        generate(teacher, proc, left_pad(random_prompts((3,), seed=1)), temperature=0.5)


@pytest.mark.parametrize("kwargs, needle", [(dict(gamma=-0.5), "gamma=-0.5"), (dict(gamma=2.0), "gamma=2.0"),
                                            (dict(tau=0.0), "tau=0.0"), (dict(gamma="x"), "gamma='x'")])
def test_bad_arguments(proxy, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ProxyMixLogitsProcessor(proxy, **(dict(gamma=GAMMA, tau=TAU) | kwargs))


# --- the norm-matched random direction -------------------------------------------------------------


def test_random_direction_matches_norm_names_and_shapes(proxy):
    g = random_grad(proxy)
    r = random_direction(g, seed=0)
    assert list(r) == list(g)
    assert all(r[n].shape == g[n].shape and r[n].dtype == g[n].dtype for n in g)
    assert grad_norm(r) == pytest.approx(grad_norm(g), rel=1e-6)
    assert all(torch.equal(r[n], random_direction(g, seed=0)[n]) for n in g)  # deterministic
    other = random_direction(g, seed=1)
    assert not any(torch.equal(r[n], other[n]) for n in g)
    # nothing of g's direction: nearly orthogonal to g in this many dimensions
    flat = lambda d: torch.cat([d[n].flatten().double() for n in g])  # noqa: E731
    cos = float(flat(r) @ flat(g) / (flat(r).norm() * flat(g).norm()))
    assert abs(cos) < 0.05
    # the draw depends on the names, not on the dict's order
    shuffled = dict(reversed(list(g.items())))
    assert all(torch.equal(random_direction(shuffled, seed=0)[n], r[n]) for n in g)


def test_random_direction_keeps_half_precision_and_refuses_a_zero_gradient():
    g = {"w": torch.randn(64, 8).to(torch.bfloat16), "b": torch.randn(8).to(torch.bfloat16)}
    r = random_direction(g, seed=3)
    assert r["w"].dtype == torch.bfloat16 and grad_norm(r) == pytest.approx(grad_norm(g), rel=1e-2)
    with pytest.raises(ValueError, match="all zeros"):
        random_direction({"w": torch.zeros(3)}, seed=0)
