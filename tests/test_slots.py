"""Per-request KV slots (antidistill.slots) against brute-force full recomputes.

Tolerance. Slot logits come from cached, padded, batched forwards; the reference from one
unpadded, uncached forward of the whole sequence. Both are fp32 and differ only by summation
order, a few ulp of the logit scale |z| (below 1 for these tiny models; the reference's
log-softmax has |log p| ≈ log V ≈ 4, so we use s = max(1, max|log p|)). Teacher log-probs are held
to 16·ulp·s ≈ 8e-6. Δ̂ divides a difference of two such values by ε_eff (2ε central, ε forward),
so its resolution is 4·ulp·s/ε_eff (as in tests/test_processor.py); we allow 8·ulp·s/ε_eff
(≈ 1e-4 at ε = 1e-2, s ≈ 4) for the padded, batched shapes each step goes through.
"""

from __future__ import annotations

import random

import pytest
import torch

from antidistill.slots import SlotDelta, SlotKV, forward_all

from conftest import (PAD, VOCAB, random_grad, random_prompts, reference_delta, reference_eq11, tiny_gpt2_proxy,
                      tiny_proxy)

EPS = 1e-2
ULP = torch.finfo(torch.float32).eps


def _scale(model, tokens) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), -1)
    return max(1.0, float(lp.abs().max()))


def _schedule(seed: int, steps: int = 14):
    """Requests joining and leaving between steps: (joins at step, prompt length, tokens to decode)."""
    rng = random.Random(seed)
    return [(rng.randrange(0, steps - 2), rng.randint(1, 11), rng.randint(1, 7)) for _ in range(9)]


def _drive(step_fn, free_fn, schedule, check, seed: int):
    """Run the schedule: each step, new requests prefill and live ones decode a random token."""
    rng = random.Random(seed + 100)
    prompts = random_prompts([n for _, n, _ in schedule], seed=seed)
    live: dict[int, list[int]] = {}
    left: dict[int, int] = {}
    pending: dict[int, list[int]] = {}
    checked = 0
    for step in range(max(j for j, _, _ in schedule) + 10):
        feeds = []
        for r, (join, _, n_dec) in enumerate(schedule):
            if join == step:
                live[r], left[r] = list(prompts[r]), n_dec
                feeds.append((r, prompts[r]))
        for r in list(live):
            if r in pending:
                feeds.append((r, pending.pop(r)))
        if not feeds:
            continue
        rng.shuffle(feeds)  # rows in any order
        out = step_fn(feeds)
        for row, (r, _) in enumerate(feeds):
            check(out, row, live[r])
            checked += 1
            left[r] -= 1
            if left[r] <= 0:
                free_fn(r)
                del live[r]
            else:
                t = rng.randrange(3, VOCAB)
                live[r].append(t)
                pending[r] = [t]
    assert checked >= 30 and not live
    return checked


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_slots_equal_full_recompute(teacher, seed):
    kv = SlotKV(teacher, pad_token_id=PAD)

    def check(out, row, tokens):
        with torch.no_grad():
            ref = torch.log_softmax(teacher(torch.tensor([tokens])).logits[0, -1].float(), -1)
        got = torch.log_softmax(out[row], -1)
        torch.testing.assert_close(got, ref, atol=16 * ULP * _scale(teacher, tokens), rtol=0)

    _drive(kv.forward, kv.free, _schedule(seed), check, seed)
    assert len(kv) == 0
    assert kv.stats["fast_steps"] > 0 and kv.stats["rebuilds"] > 0  # both paths were exercised


@pytest.mark.parametrize("difference", ["central", "forward"])
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_delta_slots_equal_reference(difference, family):
    """Δ̂ per slot equals conftest.reference_delta (separate θ±εg models, no cache, no padding);
    GPT-2's absolute positions catch any position not counted from the slot's own start."""
    proxy = tiny_proxy() if family == "qwen2" else tiny_gpt2_proxy()
    grad = random_grad(proxy)
    sd = SlotDelta(proxy, grad, eps=EPS, difference=difference, pad_token_id=PAD)
    eps_eff = 2 * EPS if difference == "central" else EPS

    def check(out, row, tokens):
        ref = reference_delta(proxy, grad, EPS, tokens, difference)
        torch.testing.assert_close(out[row], ref, atol=8 * ULP * _scale(proxy, tokens) / eps_eff, rtol=0)

    _drive(sd.forward, sd.free, _schedule(3), check, 3)


def test_eq11_from_slots_equals_reference(teacher, proxy, grad):
    """Teacher and proxies stepped together (forward_all) give eq. 11's distribution."""
    from antidistill.functional import antidistillation_logits

    sd = SlotDelta(proxy, grad, eps=EPS, pad_token_id=PAD)
    kvs = [SlotKV(teacher, pad_token_id=PAD), *sd.kvs]
    lam, tau = 0.5, 0.9

    def step(feeds):
        t, plus, minus = forward_all(kvs, feeds)
        return torch.softmax(antidistillation_logits(t, sd.from_logits(plus, minus), lam, tau), -1)

    def free(r):
        for kv in kvs:
            kv.free(r)

    def check(out, row, tokens):
        ref = reference_eq11(teacher, proxy, grad, EPS, lam, tau, tokens)
        torch.testing.assert_close(out[row], ref, atol=1e-5, rtol=1e-4)

    _drive(step, free, _schedule(5), check, 5)


def test_jvp_is_a_clear_error(proxy, grad):
    with pytest.raises(ValueError, match="jvp"):
        SlotDelta(proxy, grad, eps=EPS, difference="jvp")


def test_failed_step_changes_no_slot(teacher):
    """A forward that raises (here: a token id outside the vocabulary) leaves every slot as it was,
    in one model and across models (forward_all rolls back the models that already stepped)."""
    a, b = SlotKV(teacher, pad_token_id=PAD), SlotKV(teacher, pad_token_id=PAD)
    p = random_prompts((4, 6), seed=1)
    forward_all([a, b], [("x", p[0]), ("y", p[1])])
    forward_all([a, b], [("x", [5]), ("y", [6])])  # builds the batch (rebuild path)
    forward_all([a, b], [("x", [7]), ("y", [8])])  # fast path
    for bad in ([("x", [VOCAB + 5]), ("y", [9])], [("x", [9]), ("z", [VOCAB + 5])]):
        with pytest.raises(Exception):
            forward_all([a, b], bad)
        assert (a.length("x"), a.length("y"), "z" in a) == (6, 8, False)
    # b fails alone after a stepped: a is rolled back
    orig = b.forward
    b.forward = lambda feeds: (_ for _ in ()).throw(RuntimeError("proxy died"))
    with pytest.raises(RuntimeError):
        forward_all([a, b], [("x", [9]), ("y", [10])])
    b.forward = orig
    assert (a.length("x"), a.length("y")) == (6, 8)
    t_a, t_b = forward_all([a, b], [("x", [9]), ("y", [10])])
    with torch.no_grad():
        ref = teacher(torch.tensor([p[0] + [5, 7, 9]])).logits[0, -1].float()
    torch.testing.assert_close(torch.log_softmax(t_a[0], -1), torch.log_softmax(ref, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(t_a, t_b, atol=1e-5, rtol=0)


def test_reused_key_after_free_is_a_new_slot(teacher):
    kv = SlotKV(teacher, pad_token_id=PAD)
    p = random_prompts((5, 3), seed=2)
    kv.forward([(0, p[0]), (1, p[1])])
    kv.forward([(0, [4]), (1, [5])])
    kv.free(0)
    out = kv.forward([(0, p[1]), (1, [6])])  # key 0 again, now a different request
    with torch.no_grad():
        ref0 = teacher(torch.tensor([p[1]])).logits[0, -1].float()
        ref1 = teacher(torch.tensor([p[1] + [5, 6]])).logits[0, -1].float()
    torch.testing.assert_close(out[0], ref0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref1, atol=1e-5, rtol=0)
    out = kv.forward([(0, [7]), (1, [8])])
    with torch.no_grad():
        ref0 = teacher(torch.tensor([p[1] + [7]])).logits[0, -1].float()
    torch.testing.assert_close(out[0], ref0, atol=1e-5, rtol=0)


def test_sliding_window_models_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding"):
        SlotKV(Qwen2ForCausalLM(cfg))
