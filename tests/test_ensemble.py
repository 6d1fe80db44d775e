"""Ensemble antidistillation (Δ̂ = Σ_k w_k Δ̂_k) against a brute force: each proxy run on the full
sequence with no KV cache at θ_k ± εg_k (or its exact JVP by ``torch.func.jvp``), combined by hand."""

import copy

import pytest
import torch
from torch.func import functional_call, jvp

import antidistill
from antidistill import (
    AntidistillationLogitsProcessor,
    EnsembleDelta,
    PermutationLogitsProcessor,
    ProxyDelta,
    SamplingSettings,
    antidistillation_logits,
    ensemble_delta,
    permute_delta,
)
from antidistill.generation import build_processor

from conftest import EOS, PAD, left_pad, random_grad, random_prompts, tiny_gpt2_proxy, tiny_proxy, tiny_teacher

LAM, EPS, TAU = 0.7, 1e-2, 0.8


@pytest.fixture(scope="module")
def world():
    """A Llama teacher, a Qwen2 proxy and a GPT-2 proxy (another family, learned positions), each with its g."""
    teacher = tiny_teacher()
    proxies = [tiny_proxy(seed=1), tiny_gpt2_proxy(seed=3)]
    grads = [random_grad(proxies[0], seed=2), random_grad(proxies[1], seed=4)]
    return teacher, proxies, grads


@torch.no_grad()
def brute_force_delta(proxy, grad, tokens: list[int], difference: str) -> torch.Tensor:
    """(V,) Δ̂ of one proxy at the last position of ``tokens``: full forward, no cache, no padding."""
    ids = torch.tensor([tokens])

    def logp(model):
        return torch.log_softmax(model(ids).logits[0, -1].float(), -1)

    def shifted(scale):
        m = copy.deepcopy(proxy)
        for n, p in m.named_parameters():
            p.copy_(p.float() + scale * grad[n].float())
        return m

    if difference == "central":
        return (logp(shifted(EPS)) - logp(shifted(-EPS))) / (2 * EPS)
    if difference == "forward":
        return (logp(shifted(EPS)) - logp(proxy)) / EPS
    model = copy.deepcopy(proxy)
    model.set_attn_implementation("eager")
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: grad[n].to(p.dtype) for n, p in params.items()}

    def f(ps):
        return torch.log_softmax(functional_call(model, ps, args=(ids,)).logits[0, -1].float(), -1)

    return jvp(f, (params,), (tangents,))[1]


@torch.no_grad()
def brute_force_eq11(teacher, proxies, grads, weights, tokens, difference, lam=LAM) -> torch.Tensor:
    """(V,) eq. 11 probabilities with Δ̂ = Σ_k w_k Δ̂_k, weights normalised by hand."""
    total = sum(weights)
    delta = sum((w / total) * brute_force_delta(p, g, tokens, difference) for p, g, w in zip(proxies, grads, weights))
    logp_t = torch.log_softmax(teacher(torch.tensor([tokens])).logits[0, -1].float(), -1)
    return torch.softmax(logp_t / TAU + lam * delta, -1)


def run(teacher, proc, inputs, seed=0, max_new_tokens=4):
    torch.manual_seed(seed)
    return antidistill.generate(teacher, **inputs, processor=proc, max_new_tokens=max_new_tokens, temperature=TAU,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS)


def unpadded(row: torch.Tensor, mask_width: int, prompt_mask: torch.Tensor) -> list[int]:
    """The row's real tokens: its prompt without the left padding, then everything generated."""
    return row[: mask_width][prompt_mask.bool()].tolist() + row[mask_width:].tolist()


@pytest.mark.parametrize("difference", ["central", "forward", "jvp"])
def test_ensemble_matches_brute_force_over_decode_steps_with_left_padding(world, difference):
    teacher, proxies, grads = world
    weights = [2.0, 1.0]
    proc = AntidistillationLogitsProcessor(proxies, grads, lam=LAM, eps=EPS, tau=TAU, difference=difference,
                                           proxy_weights=weights, pad_token_id=PAD)
    inputs = left_pad(random_prompts((3, 7, 5), seed=11))
    width = inputs["input_ids"].shape[1]
    out = run(teacher, proc, inputs)
    assert len(out.scores) == 4
    for t, scores in enumerate(out.scores):
        probs = torch.softmax(scores, -1)
        for b in range(scores.shape[0]):
            tokens = unpadded(out.sequences[b, : width + t], width, inputs["attention_mask"][b])
            ref = brute_force_eq11(teacher, proxies, grads, weights, tokens, difference)
            torch.testing.assert_close(probs[b], ref, atol=2e-5, rtol=1e-4, msg=f"{difference} step {t} row {b}")


def test_one_proxy_in_a_list_is_the_single_proxy_processor_bit_for_bit(world):
    teacher, proxies, grads = world
    inputs = left_pad(random_prompts((4, 6), seed=12))
    single = run(teacher, AntidistillationLogitsProcessor(proxies[0], grads[0], lam=LAM, eps=EPS, tau=TAU), inputs)
    for weights in (None, [3.0]):
        listed = run(teacher, AntidistillationLogitsProcessor([proxies[0]], [grads[0]], lam=LAM, eps=EPS, tau=TAU,
                                                              proxy_weights=weights), inputs)
        assert torch.equal(single.sequences, listed.sequences)
        assert all(torch.equal(a, b) for a, b in zip(single.scores, listed.scores))


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_weights_one_zero_are_the_first_proxy_alone(world, difference):
    teacher, proxies, grads = world
    inputs = left_pad(random_prompts((5, 3), seed=13))
    alone = run(teacher, AntidistillationLogitsProcessor(proxies[0], grads[0], lam=LAM, eps=EPS, tau=TAU,
                                                         difference=difference), inputs)
    pair = run(teacher, AntidistillationLogitsProcessor(proxies, grads, lam=LAM, eps=EPS, tau=TAU, difference=difference,
                                                        proxy_weights=(1, 0)), inputs)
    assert torch.equal(alone.sequences, pair.sequences)
    assert all(torch.equal(a, b) for a, b in zip(alone.scores, pair.scores))


def test_lambda_zero_is_plain_temperature_sampling(world):
    teacher, proxies, grads = world
    inputs = left_pad(random_prompts((4, 6, 2), seed=14))
    proc = AntidistillationLogitsProcessor(proxies, grads, lam=0.0, eps=EPS, tau=TAU)
    got = run(teacher, proc, inputs)
    torch.manual_seed(0)
    plain = teacher.generate(**inputs, do_sample=True, temperature=TAU, top_k=0, top_p=1.0, max_new_tokens=4,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(got.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, plain.scores))


def test_the_ensemble_delta_is_the_weighted_sum_of_the_members(world):
    _, proxies, grads = world
    ids = torch.tensor(random_prompts((6,), seed=15))
    members = [ProxyDelta(p, g, eps=EPS)(ids) for p, g in zip(proxies, grads)]
    got = EnsembleDelta(proxies, grads, eps=EPS, proxy_weights=[1, 3])(ids)
    torch.testing.assert_close(got, 0.25 * members[0] + 0.75 * members[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(EnsembleDelta(proxies, grads, eps=EPS)(ids), (members[0] + members[1]) / 2,
                               rtol=0, atol=1e-6)


def test_permutation_processor_permutes_the_ensemble_delta(world):
    _, proxies, grads = world
    ids = torch.tensor(random_prompts((5, 5), seed=16))
    proc = PermutationLogitsProcessor(proxies, grads, lam=LAM, eps=EPS, tau=TAU, seed=7)
    want = permute_delta(EnsembleDelta(proxies, grads, eps=EPS)(ids), torch.Generator().manual_seed(7))
    assert torch.equal(proc.compute_delta(ids), want)


def test_build_processor_takes_lists(world):
    _, proxies, grads = world
    s = SamplingSettings(method="antidistill", lam=LAM, eps=EPS, tau=TAU)
    proc = build_processor(s, proxies, grads, proxy_weights=[1, 2])
    assert isinstance(proc.proxy_delta, EnsembleDelta) and proc.proxy_delta.weights == (1 / 3, 2 / 3)
    assert proc.n_proxies == 2


def test_pure_function_and_eq11_with_several_deltas():
    a, b = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.0, 4.0, -1.0]])
    torch.testing.assert_close(ensemble_delta([a, b]), (a + b) / 2)
    torch.testing.assert_close(ensemble_delta([a, b], [3, 1]), 0.75 * a + 0.25 * b)
    assert torch.equal(ensemble_delta([a]), a)
    assert torch.equal(ensemble_delta([a, torch.full_like(b, float("nan"))], [1, 0]), a)  # weight 0: not even a NaN
    z = torch.tensor([[0.3, -0.1, 0.9]])
    assert torch.equal(antidistillation_logits(z, [a, b], 0.5, 0.9, proxy_weights=[3, 1]),
                       antidistillation_logits(z, ensemble_delta([a, b], [3, 1]), 0.5, 0.9))
    with pytest.raises(ValueError, match="proxy_weights is given but delta is one tensor"):
        antidistillation_logits(z, a, 0.5, 0.9, proxy_weights=[1.0])
    with pytest.raises(ValueError, match="at least one proxy"):
        ensemble_delta([])


@pytest.mark.parametrize("weights, match", [
    ([1.0, -1.0], "proxy_weights must be finite numbers >= 0"),
    ([1.0, float("nan")], "proxy_weights must be finite numbers >= 0"),
    ([1.0, float("inf")], "proxy_weights must be finite numbers >= 0"),
    ([0, 0], "proxy_weights must not all be 0"),
    ([1.0], "proxy_weights has 1 entries for 2 proxies"),
    ([1.0, 1.0, 1.0], "proxy_weights has 3 entries for 2 proxies"),
])
def test_bad_weights_raise(world, weights, match):
    _, proxies, grads = world
    with pytest.raises(ValueError, match=match):
        AntidistillationLogitsProcessor(proxies, grads, lam=LAM, eps=EPS, tau=TAU, proxy_weights=weights)
    with pytest.raises(ValueError, match=match):
        ensemble_delta([torch.zeros(1, 3), torch.zeros(1, 3)], weights)


def test_bad_lengths_raise(world):
    _, proxies, grads = world
    with pytest.raises(ValueError, match="grad must hold one gradient per proxy: 2 proxies, 1 gradient"):
        AntidistillationLogitsProcessor(proxies, grads[:1], lam=LAM, eps=EPS, tau=TAU)
    with pytest.raises(ValueError, match="grad must hold one gradient per proxy: 2 proxies, one gradient not in a list"):
        AntidistillationLogitsProcessor(proxies, grads[0], lam=LAM, eps=EPS, tau=TAU)
    with pytest.raises(ValueError, match=r"grad must hold one gradient per proxy: 1 proxies, 2 gradient\(s\)"):
        AntidistillationLogitsProcessor(proxies[:1], grads, lam=LAM, eps=EPS, tau=TAU)
    with pytest.raises(ValueError, match="only with a list of proxies"):
        AntidistillationLogitsProcessor(proxies[0], grads, lam=LAM, eps=EPS, tau=TAU)
    with pytest.raises(ValueError, match="only with a list of proxies"):
        AntidistillationLogitsProcessor(proxies[0], grads[0], lam=LAM, eps=EPS, tau=TAU, proxy_weights=[1.0])
    with pytest.raises(ValueError, match="proxy is an empty list"):
        AntidistillationLogitsProcessor([], [], lam=LAM, eps=EPS, tau=TAU)
    with pytest.raises(ValueError, match=r"deltas\[1\] has shape \(1, 4\)"):
        ensemble_delta([torch.zeros(1, 3), torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="vocabularies differ in width"):
        EnsembleDelta([proxies[0], tiny_proxy(seed=5, vocab=64)], [grads[0], random_grad(tiny_proxy(seed=5, vocab=64))],
                      eps=EPS)


def test_vllm_refuses_several_proxies_before_writing_anything(world, tmp_path):
    from antidistill.engines.vllm.setup import VllmSettings, build_llm, check_models, write_composite

    teacher, proxies, _ = world
    teacher.save_pretrained(tmp_path / "teacher")
    paths = []
    for k, p in enumerate(proxies):
        p.save_pretrained(tmp_path / f"proxy{k}")
        paths.append(str(tmp_path / f"proxy{k}"))
    grads = [str(tmp_path / "g0.safetensors"), str(tmp_path / "g1.safetensors")]
    hint = "ensemble antidistillation .* runs on the transformers engine"
    with pytest.raises(ValueError, match=f"one proxy, got a list of 2 for proxy: {hint}"):
        write_composite(tmp_path / "teacher", paths, grads, VllmSettings(lam=0.5, eps=EPS, tau=TAU), tmp_path / "out")
    with pytest.raises(ValueError, match=f"got a list of 2 for grad: {hint}"):
        write_composite(tmp_path / "teacher", paths[0], grads, VllmSettings(lam=0.5, eps=EPS, tau=TAU), tmp_path / "o")
    with pytest.raises(ValueError, match=hint):
        check_models(tmp_path / "teacher", paths)
    with pytest.raises(ValueError, match=hint):
        build_llm(tmp_path / "teacher", paths, grads, settings=VllmSettings(lam=0.5, eps=EPS, tau=TAU),
                  workdir=tmp_path / "w")
    assert not any((tmp_path / d).exists() for d in ("out", "o", "w"))
