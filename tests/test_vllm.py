"""Antidistillation on vLLM's CPU build: exactness against the brute-force eq. 11, and the serving guard.

One serving-mode engine for the module, with a KV budget small enough to force preemption and
recompute, more requests than ``max_num_seqs`` (requests join as others leave, and finished rows
are overwritten without being reported as removed) and requests of different lengths.
"""

from __future__ import annotations

import pytest
import torch

from conftest import reference_eq11
from vllm_helpers import eq11_tolerance, full_logprobs

LAM, EPS, TAU = 0.5, 1e-2, 0.9
BYTES_PER_TOKEN = 6 * 2 * 2 * 32 * 4  # (2 teacher + 2×2 proxy layers) × (K, V) × 2 kv heads × head_dim 32 × fp32


@pytest.fixture(scope="module")
def llm(vllm_world, tmp_path_factory):
    from antidistill.engines.vllm import VllmSettings, build_llm

    paths = vllm_world[0]
    engine = build_llm(
        paths["teacher"], paths["proxy"], paths["grad"], settings=VllmSettings(lam=LAM, eps=EPS, tau=TAU),
        workdir=tmp_path_factory.mktemp("composite"),
        kv_cache_memory_bytes=192 * BYTES_PER_TOKEN,  # 192 tokens of KV: 6 running requests of ~50 tokens preempt
        block_size=32, max_model_len=96, max_num_seqs=6, max_logprobs=-1, disable_log_stats=False,
    )
    yield engine
    del engine


def _check_request(vllm_world, prompt, out, temperature):
    _, tok, teacher, proxy, g = vllm_world
    vocab = len(tok)
    toks = list(prompt)
    worst = 0.0
    for k, tid in enumerate(out.token_ids):
        got = full_logprobs(out.logprobs[k], vocab).exp()
        with torch.no_grad():
            scale = teacher(torch.tensor([toks])).logits[0, -1].abs().max().item()
        q = reference_eq11(teacher, proxy, g, EPS, LAM, TAU, toks)
        t_eff = max(temperature, TAU)
        ref = q ** (TAU / t_eff)
        ref = ref / ref.sum()
        tol = eq11_tolerance(scale, LAM, EPS, TAU) * max(1.0, TAU / t_eff)
        err = (got - ref).abs().max().item()
        assert err <= tol, f"token {k}: |Δp| = {err:.3g} > {tol:.3g} (T={temperature})"
        worst = max(worst, err)
        toks.append(tid)
    return worst


def test_eq11_exact_under_continuous_batching_and_preemption(vllm_world, llm):
    from vllm import SamplingParams, TokensPrompt

    from antidistill.engines.vllm.processor import ServeLogitsProcessor
    from conftest import random_prompts

    stats0 = dict(ServeLogitsProcessor.stats)
    lengths = [3, 17, 6, 25, 9, 4, 30, 12, 7, 20]
    max_tokens = [40, 8, 45, 30, 3, 48, 20, 35, 12, 44]
    temps = [TAU, 0.0, TAU, 2.0, TAU, 0.3, TAU, TAU, 1.5, TAU]
    prompts = [[2] + p[1:] for p in random_prompts(lengths, seed=5)]
    prompts = [[min(t, len(vllm_world[1]) - 1) for t in p] for p in prompts]
    params = [SamplingParams(temperature=t, max_tokens=m, logprobs=-1, seed=i, ignore_eos=True)
              for i, (t, m) in enumerate(zip(temps, max_tokens))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    worst = max(_check_request(vllm_world, p, o.outputs[0], t) for p, o, t in zip(prompts, outs, temps))
    assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens
    stats = {k: ServeLogitsProcessor.stats[k] - stats0.get(k, 0) for k in ServeLogitsProcessor.stats}
    assert stats["implicit_removals"] > 0, stats  # finished rows overwritten without a `removed` entry
    assert stats["added"] >= len(prompts) + 1, stats  # at least one re-add: a preempted request recomputed
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0, "the KV budget did not force a preemption"
    print(f"worst |Δp| {worst:.3g}, preemptions {preemptions}, processor {stats}")


def test_temperature_zero_samples_q_not_argmax(vllm_world, llm):
    """T = 0 and T < τ return q's logprobs (not a one-hot), and seeded requests repeat."""
    from vllm import SamplingParams, TokensPrompt

    prompt = [2, 10, 11, 12]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * 2,
                        [SamplingParams(temperature=0.0, max_tokens=6, logprobs=-1, seed=7, ignore_eos=True)] * 2,
                        use_tqdm=False)
    a, b = outs[0].outputs[0], outs[1].outputs[0]
    assert a.token_ids == b.token_ids
    _check_request(vllm_world, prompt, a, 0.0)
    probs = full_logprobs(a.logprobs[0], len(vllm_world[1])).exp()
    assert probs.max().item() < 0.999  # a real distribution, not argmax


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"extra_args": {"lam": 0.0}}, "operator-only"),
        ({"extra_args": {"EPS": 1.0}}, "operator-only"),
        ({"extra_args": {"antidistill_mode": "teacher"}}, "operator-only"),
        ({"logit_bias": {5: 10.0}}, "logit_bias"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"repetition_penalty": 1.3}, "penalties"),
    ],
)
def test_request_cannot_reach_operator_settings(llm, kwargs, needle):
    from vllm import SamplingParams, TokensPrompt

    with pytest.raises(Exception, match=needle):  # vllm.exceptions.VLLMValidationError: HTTP 400 when served
        llm.generate([TokensPrompt(prompt_token_ids=[2, 5, 6])], SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)


def test_validate_params_raises_temperature_to_tau(llm):
    from vllm import SamplingParams

    from antidistill.engines.vllm.processor import ServeLogitsProcessor

    for t, want in ((0.0, TAU), (0.5, TAU), (TAU, TAU), (1.7, 1.7)):
        sp = SamplingParams(temperature=t)
        ServeLogitsProcessor.validate_params(sp)
        assert sp.temperature == pytest.approx(want)
