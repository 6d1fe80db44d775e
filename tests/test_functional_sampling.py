"""The pure sampling functions a server uses: eq. 11, flattening min(1, τ/T), top-p, seeded rows."""

from __future__ import annotations

import math

import pytest
import torch

from antidistill.functional import antidistillation_logits
from antidistill.sampling import flattening, row_generator, sample_rows, sampling_logprobs, top_p_filter


def _rows(b=4, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 2, torch.randn(b, v, generator=g)


def test_sampling_logprobs_hand_computed():
    """Row by row: log_softmax(f·(log p/τ + λΔ̂)) with f = 1 for T ≤ τ and τ/T above."""
    t, d = _rows()
    t, d = t[:1].repeat(4, 1), d[:1].repeat(4, 1)  # one row at four temperatures
    lam, tau = 0.7, 0.8
    temps = torch.tensor([0.0, 0.5, 0.8, 1.6])
    lp, ok = sampling_logprobs(t, d, lam, tau, temps, torch.ones(4))
    assert ok.all()
    for b, T in enumerate(temps.tolist()):
        z = torch.log_softmax(t[b], -1) / tau + lam * d[b]
        f = 1.0 if T <= tau else tau / T
        torch.testing.assert_close(lp[b], torch.log_softmax(f * z, -1), atol=1e-6, rtol=0)
    # T ≤ τ (0 included) is q itself; T = 2τ is q^(1/2), renormalised
    torch.testing.assert_close(lp[0], lp[1])
    torch.testing.assert_close(lp[0], lp[2])
    q = lp[0].exp()
    torch.testing.assert_close(lp[3].exp(), q.sqrt() / q.sqrt().sum(), atol=1e-6, rtol=0)


def test_no_temperature_pair_isolates_the_teacher_term():
    """log q_T1 − log q_T2 is a multiple of the eq. 11 logit, never of log p_T alone."""
    t, d = _rows(1, 30, seed=1)
    lam, tau = 1.0, 0.9
    z = antidistillation_logits(t, d, lam, tau)[0]
    for t1, t2 in [(1.0, 2.0), (0.3, 0.7), (0.5, 1.9)]:
        lp, _ = sampling_logprobs(t.repeat(2, 1), d.repeat(2, 1), lam, tau, torch.tensor([t1, t2]), torch.ones(2))
        diff = (lp[0] - lp[0, 0]) - (lp[1] - lp[1, 0])
        c = (flattening(tau, torch.tensor([t1])) - flattening(tau, torch.tensor([t2])))[0]
        torch.testing.assert_close(diff, c * (z - z[0]), atol=1e-5, rtol=0)


def test_lam_zero_is_plain_temperature_and_needs_no_delta():
    t, _ = _rows()
    lp, ok = sampling_logprobs(t, None, 0.0, 0.9, torch.full((4,), 1.8), torch.ones(4))
    assert ok.all()
    torch.testing.assert_close(lp, torch.log_softmax(torch.log_softmax(t, -1) / 1.8, -1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        sampling_logprobs(t, None, 0.5, 0.9, torch.ones(4), torch.ones(4))


def test_nonfinite_rows_are_flagged_never_replaced_by_the_teacher():
    t, d = _rows()
    d[1, 3] = float("nan")
    d[2, 0] = float("inf")
    lp, ok = sampling_logprobs(t, d, 0.5, 0.9, torch.ones(4), torch.ones(4))
    assert ok.tolist() == [True, False, False, True]
    assert torch.isnan(lp[1]).all() and torch.isnan(lp[2]).all()  # nothing to sample, no teacher fallback
    assert torch.isfinite(lp[[0, 3]]).all()


def test_top_p_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = top_p_filter(logits, torch.tensor([0.6, 1.0, 0.1]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # 0.5 < 0.6 ≤ 0.8
    assert torch.isfinite(out[1]).all()
    assert torch.isfinite(out[2]).sum() == 1  # the most likely token is always kept
    lp, _ = sampling_logprobs(logits, None, 0.0, 1.0, torch.zeros(3), torch.tensor([0.6, 1.0, 0.1]))
    torch.testing.assert_close(lp[0, :2].exp(), torch.tensor([0.625, 0.375]), atol=1e-6, rtol=0)
    assert math.isinf(float(lp[0, 3]))


def test_seeded_rows_do_not_depend_on_the_batch():
    lp = torch.log_softmax(torch.randn(5, 40, generator=torch.Generator().manual_seed(3)), -1)
    alone = [sample_rows(lp[[i]], [row_generator(100 + i)])[0].item() for i in range(5)]
    for _ in range(3):
        together = sample_rows(lp, [row_generator(100 + i) for i in range(5)]).tolist()
        assert together == alone
    mixed = sample_rows(lp, [row_generator(100), None, row_generator(102), None, row_generator(104)])
    assert mixed[[0, 2, 4]].tolist() == [alone[0], alone[2], alone[4]]


def test_row_generator_accepts_int64_only():
    for s in (0, -1, 2**63 - 1, -(2**63)):
        assert row_generator(s) is not None
    for s in (2**63, 2**64, -(2**63) - 1, 1.5):
        with pytest.raises(ValueError, match="int64"):
            row_generator(s)
    assert row_generator(None) is None
