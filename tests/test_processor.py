"""The sampler against a brute-force eq. 11: separate θ±εg models, no cache, no padding, full recompute."""


import pytest
import torch
from transformers import TopPLogitsWarper

import antidistill
from antidistill import AntidistillationLogitsProcessor, PermutationLogitsProcessor
from antidistill.proxy import ProxyDelta

from conftest import EOS, PAD, left_pad, random_grad, random_prompts, reference_delta, reference_eq11, tiny_gpt2_proxy, tiny_proxy

LAM, EPS, TAU = 0.7, 1e-2, 0.8


def strip_left_pad(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    i = 0
    while i < len(ids) and ids[i] == PAD:
        i += 1
    return ids[i:]


def generate(teacher, proc, inputs, seed=0, max_new_tokens=5, **kw):
    torch.manual_seed(seed)
    args = dict(do_sample=True, temperature=TAU, top_k=0, top_p=1.0) | kw
    return antidistill.generate(
        teacher, **inputs, processor=proc, max_new_tokens=max_new_tokens,
        output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS, **args,
    )


def check_against_reference(teacher, proxy, grad, out, prompt_width, difference="central", lam=LAM, atol=2e-5):
    for t, scores in enumerate(out.scores):
        probs = torch.softmax(scores, -1)
        for b in range(scores.shape[0]):
            tokens = strip_left_pad(out.sequences[b, : prompt_width + t])
            ref = reference_eq11(teacher, proxy, grad, EPS, lam, TAU, tokens, difference)
            torch.testing.assert_close(probs[b], ref, atol=atol, rtol=1e-4, msg=f"step {t} row {b}")


@pytest.mark.parametrize("difference", ["central", "forward", pytest.param("jvp", marks=pytest.mark.slow)])
def test_matches_brute_force_left_padded_and_repeated_calls(teacher, proxy, grad, difference):
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU, difference=difference)
    # three calls on one processor: different lengths, then prompts longer than anything before
    for call, lengths in enumerate([(3, 7, 5), (9, 4), (16, 12, 15, 2)]):
        inputs = left_pad(random_prompts(lengths, seed=10 + call))
        out = generate(teacher, proc, inputs, seed=call)
        check_against_reference(teacher, proxy, grad, out, inputs["input_ids"].shape[1], difference)


def test_sequences_that_finish_early(teacher, proxy, grad):
    """A large λ toward EOS makes rows stop at different steps; later scores must still be right."""
    g = dict(grad)
    proc = AntidistillationLogitsProcessor(proxy, g, lam=LAM, eps=EPS, tau=TAU)
    inputs = left_pad(random_prompts((4, 6, 3, 8), seed=5))
    # force some rows to end: bias the teacher by a processor placed before ours
    class EosBias:
        def __call__(self, input_ids, scores):
            s = scores.clone()
            s[::2, EOS] += 6.0
            return s
    torch.manual_seed(0)
    out = antidistill.generate(
        teacher, **inputs, processor=proc, logits_processor=[EosBias()], max_new_tokens=6,
        output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS,
    )
    seqs = out.sequences[:, inputs["input_ids"].shape[1]:]
    finished_early = [(r == EOS).nonzero()[0].item() < seqs.shape[1] - 1 for r in seqs if (r == EOS).any()]
    assert any(finished_early), "test setup: some row must finish before the last step"
    W = inputs["input_ids"].shape[1]
    for t, scores in enumerate(out.scores):
        for b in range(scores.shape[0]):
            tokens = strip_left_pad(out.sequences[b, : W + t])
            logp_t = torch.log_softmax(teacher(torch.tensor([tokens])).logits[0, -1].float(), -1)
            if b % 2 == 0:
                logp_t = torch.log_softmax(teacher(torch.tensor([tokens])).logits[0, -1].float() + 6.0 * (torch.arange(logp_t.numel()) == EOS), -1)
            ref = torch.softmax(logp_t / TAU + LAM * reference_delta(proxy, g, EPS, tokens), -1)
            torch.testing.assert_close(torch.softmax(scores[b], -1), ref, atol=2e-5, rtol=1e-4)


def test_top_p_applies_afterwards(teacher, proxy, grad):
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU)
    inputs = left_pad(random_prompts((5, 8), seed=7))
    out = generate(teacher, proc, inputs, top_p=0.6)
    W = inputs["input_ids"].shape[1]
    warper = TopPLogitsWarper(0.6)
    for t, scores in enumerate(out.scores):
        for b in range(2):
            tokens = strip_left_pad(out.sequences[b, : W + t])
            ref_p = reference_eq11(teacher, proxy, grad, EPS, LAM, TAU, tokens)
            ref = warper(None, ref_p.log()[None])[0]
            assert torch.equal(torch.isinf(scores[b]), torch.isinf(ref))
            torch.testing.assert_close(torch.softmax(scores[b], -1), torch.softmax(ref, -1), atol=2e-5, rtol=1e-4)


def test_lambda_zero_is_exactly_temperature_sampling(teacher, proxy, grad):
    inputs = left_pad(random_prompts((3, 6), seed=1))
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=0.0, eps=EPS, tau=TAU)
    a = generate(teacher, proc, inputs, seed=123, max_new_tokens=8)
    torch.manual_seed(123)
    b = teacher.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=TAU, top_k=0, top_p=1.0,
                         pad_token_id=PAD, eos_token_id=EOS, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert torch.equal(sa, sb)


def test_processor_never_mutates_input(proxy, grad):
    for cls in (AntidistillationLogitsProcessor, PermutationLogitsProcessor):
        proc = cls(proxy, grad, lam=LAM, eps=EPS, tau=TAU)
        ids = torch.tensor([[PAD, 2, 5, 9], [2, 7, 8, 3]])
        scores = torch.randn(2, proxy.config.vocab_size)
        ids0, scores0 = ids.clone(), scores.clone()
        out = proc(ids, scores)
        assert torch.equal(ids, ids0) and torch.equal(scores, scores0)
        assert out.data_ptr() != scores.data_ptr()


def test_proxy_itself_is_untouched(grad):
    proxy = tiny_proxy()
    before = {n: p.clone() for n, p in proxy.named_parameters()}
    for d in ("central", "forward"):
        AntidistillationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU, difference=d)
    for n, p in proxy.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("difference", ["central", "forward", "jvp"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_equals_recompute(grad, difference, attn):
    """Δ̂ with the KV cache, step by step under left padding, equals a no-cache recompute.

    The caches are exact: proxy logits agree to ~1 ulp (6e-8 here). Δ̂ divides a logit difference
    by ε_eff = 2ε (central) or ε (forward), so its fp32 resolution is ~2 ulp(|z|max)/ε_eff:
    1.2e-5 for central and 2.4e-5 for forward at ε = 1e-2, with |z| < 1. JVP has no such
    amplification and is held to 1e-5.
    """
    proxy = tiny_proxy(attn=attn)
    ulp = torch.finfo(torch.float32).eps  # relative; the tiny proxy's logits are below 1 in magnitude
    eps_eff = {"central": 2 * EPS, "forward": EPS}.get(difference)
    atol = 1e-5 if eps_eff is None else 4 * ulp / eps_eff
    cached = ProxyDelta(proxy, grad, eps=EPS, difference=difference, pad_token_id=PAD)
    fresh = ProxyDelta(proxy, grad, eps=EPS, difference=difference, pad_token_id=PAD)
    inputs = left_pad(random_prompts((2, 9, 5), seed=4))
    ids = inputs["input_ids"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        d_cached = cached(ids)
        fresh.reset()
        d_fresh = fresh(ids)
        torch.testing.assert_close(d_cached, d_fresh, atol=atol, rtol=0)
        ids = torch.cat([ids, torch.randint(3, 40, (3, 1), generator=gen)], 1)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_left_padding_respects_positions(family):
    """A left-padded row gives the same Δ̂ as the same row alone, for a RoPE proxy and for one with
    absolute positions (the one that catches positions not shifted past the padding)."""
    proxy = tiny_proxy() if family == "qwen2" else tiny_gpt2_proxy()
    grad = random_grad(proxy)
    eng = ProxyDelta(proxy, grad, eps=EPS, pad_token_id=PAD)
    rows = random_prompts((3, 10), seed=9)
    batch = eng(left_pad(rows)["input_ids"])
    for i, r in enumerate(rows):
        eng.reset()
        # fp32 resolution of a central Δ̂ at ε = 1e-2 (see test_cache_equals_recompute): the engine
        # differences logits (|z| < 1), so padded and unpadded rows agree to 4 ulp(1) / 2ε.
        ulp = torch.finfo(torch.float32).eps
        torch.testing.assert_close(batch[i], eng(torch.tensor([r]))[0], atol=4 * ulp / (2 * EPS), rtol=0)
        # The brute-force reference subtracts two fp32 log-softmaxes, whose round-off is relative
        # to |log p| (about log V = 3.9 here, not 1), so its own resolution is that many times coarser.
        ref = reference_delta(proxy, grad, EPS, r)
        with torch.no_grad():
            scale = torch.log_softmax(proxy(torch.tensor([r])).logits[0, -1].float(), -1).abs().max().clamp(min=1)
        torch.testing.assert_close(batch[i], ref, atol=4 * ulp * float(scale) / (2 * EPS), rtol=0)


def test_jvp_equals_autograd_directional_derivative(proxy, grad):
    """jvp mode is exact: ⟨∇θ log p(x), g⟩ by reverse-mode autograd, to float32 round-off."""
    from antidistill.experiment.fdcheck import autograd_directional_derivative

    tokens = random_prompts((11,), seed=2)[0]
    eng = ProxyDelta(proxy, grad, eps=EPS, difference="jvp", pad_token_id=PAD)
    jvp = eng(torch.tensor([tokens]))[0]
    ref = autograd_directional_derivative(proxy, grad, torch.tensor([tokens]))[0]
    torch.testing.assert_close(jvp, ref, atol=1e-5, rtol=1e-4)


def test_permutation_processor_keeps_abs_multiset(proxy, grad):
    proc = PermutationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU, seed=0, pad_token_id=PAD)
    plain = ProxyDelta(proxy, grad, eps=EPS, pad_token_id=PAD)
    ids = left_pad(random_prompts((4, 7), seed=3))["input_ids"]
    permuted = proc.compute_delta(ids)
    true = plain(ids)
    torch.testing.assert_close(permuted.abs().sort(-1).values, true.abs().sort(-1).values, atol=0, rtol=0)
    assert not torch.allclose(permuted, true)
    # seeded: the same seed gives the same permutation
    proc2 = PermutationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU, seed=0, pad_token_id=PAD)
    assert torch.equal(proc2.compute_delta(ids), permuted)


def test_temperature_mismatch_is_an_error(teacher, proxy, grad):
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU)
    inputs = left_pad(random_prompts((3,), seed=1))
    with pytest.raises(ValueError, match=r"temperature=0.5.*tau=0.8"):
        generate(teacher, proc, inputs, temperature=0.5)
    with pytest.raises(ValueError, match=r"temperature=1.0.*tau=0.8"):
        generate(teacher, proc, inputs, temperature=1.0)


def test_tau_is_given_once_to_the_processor(teacher, proxy, grad):
    """No stack inspection: the processor applies τ itself, so a bare ``model.generate`` at its default
    temperature, the documented ``**proc.generate_kwargs()``, and ``antidistill.generate`` (with or
    without the same τ) all sample eq. 11 with identical scores. A bare ``model.generate`` does not hand
    the processor its attention mask, so the processor is given the padding id the calls use."""
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU, pad_token_id=PAD)
    inputs = left_pad(random_prompts((3, 5), seed=1))
    common = dict(max_new_tokens=3, output_scores=True, return_dict_in_generate=True, pad_token_id=PAD,
                  eos_token_id=EOS)
    runs = []
    for call in (lambda: teacher.generate(**inputs, logits_processor=[proc], do_sample=True, top_k=0, **common),
                 lambda: teacher.generate(**inputs, logits_processor=[proc], **proc.generate_kwargs(), **common),
                 lambda: antidistill.generate(teacher, **inputs, processor=proc, **common),
                 lambda: antidistill.generate(teacher, **inputs, processor=proc, temperature=TAU, **common)):
        torch.manual_seed(0)
        runs.append(call())
    for out in runs[1:]:
        assert torch.equal(out.sequences, runs[0].sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, runs[0].scores))
    check_against_reference(teacher, proxy, grad, runs[0], inputs["input_ids"].shape[1])


def test_extreme_lambda_rows_are_refused_never_the_teacher(teacher, proxy, grad):
    """λ·Δ̂ overflows float32 to ±inf (as a bf16 proxy can): such rows are refused by the one non-finite
    rule: they may only emit end-of-sequence, and no score row is ever the teacher's own distribution."""
    big = {k: v * 1e3 for k, v in grad.items()}
    eos = EOS
    proc = AntidistillationLogitsProcessor(proxy, big, lam=1e38, eps=EPS, tau=TAU, eos_token_id=eos)
    inputs = left_pad(random_prompts((3, 5), seed=1))
    with pytest.warns(RuntimeWarning, match="refused"):
        out = generate(teacher, proc, inputs, max_new_tokens=3)
    assert proc.n_refused_rows > 0
    W = inputs["input_ids"].shape[1]
    first = torch.softmax(out.scores[0], -1)
    for b in range(first.shape[0]):
        assert torch.isfinite(first[b]).all()
        assert first[b, eos] == 1.0  # the refused row can only end
    assert (out.sequences[:, W] == eos).all()
    logp_t = torch.log_softmax(teacher(out.sequences[:1, :W]).logits[0, -1].float(), -1)
    assert not torch.allclose(first[0], torch.softmax(logp_t / TAU, -1), atol=1e-3)


def test_refused_row_without_an_eos_id_raises(proxy, grad):
    from antidistill.functional import NonFiniteScores, refuse_nonfinite

    with pytest.raises(NonFiniteScores):
        refuse_nonfinite(torch.tensor([[float("nan"), 0.0]]), [])
    scores = torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [float("-inf"), float("-inf")]])
    out, bad = refuse_nonfinite(scores, [1])
    assert bad.tolist() == [False, True, True] and torch.isinf(scores[1, 0])  # input untouched
    assert out[0].tolist() == [0.0, 1.0] and out[1].tolist() == out[2].tolist() == [float("-inf"), 0.0]


def test_vocab_mismatch_names_both_sizes(proxy, grad):
    from conftest import tiny_teacher

    big = tiny_teacher(vocab=64)
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=LAM, eps=EPS, tau=TAU)
    inputs = left_pad(random_prompts((3,), seed=1))
    with pytest.raises(ValueError, match="teacher vocabulary size 64 differs from proxy vocabulary size 48"):
        generate(big, proc, inputs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(eps=0.0), "eps=0.0"), (dict(eps=-1.0), "eps=-1.0"), (dict(tau=0.0), "tau=0.0"),
        (dict(tau=-0.5), "tau=-0.5"), (dict(lam=float("nan")), "lam=nan"), (dict(lam=float("-inf")), "lam=-inf"),
        (dict(difference="backward"), "difference='backward'"),
    ],
)
def test_bad_arguments(proxy, grad, kwargs, needle):
    args = dict(lam=LAM, eps=EPS, tau=TAU) | kwargs
    with pytest.raises(ValueError, match=needle):
        AntidistillationLogitsProcessor(proxy, grad, **args)
