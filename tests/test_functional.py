import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antidistill.functional import (
    antidistillation_logits,
    finite_difference_delta,
    nonfinite_rows,
    permute_delta,
    sine_error,
)


def test_central_and_forward_by_hand():
    plus = torch.tensor([[0.5, 0.25, 0.25]]).log()
    other = torch.tensor([[0.25, 0.25, 0.5]]).log()
    l2 = math.log(2.0)
    torch.testing.assert_close(finite_difference_delta(plus, other, 0.25, "central"), torch.tensor([[2 * l2, 0.0, -2 * l2]]))
    torch.testing.assert_close(finite_difference_delta(plus, other, 0.25, "forward"), torch.tensor([[4 * l2, 0.0, -4 * l2]]))


def test_logits_or_logprobs_give_the_same_delta():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, generator=g) * 5, torch.randn(3, 9, generator=g) * 5
    for diff in ("central", "forward"):
        from_logits = finite_difference_delta(a + 7.0, b - 3.0, 0.1, diff)  # arbitrary row shifts
        from_logprobs = finite_difference_delta(torch.log_softmax(a, -1), torch.log_softmax(b, -1), 0.1, diff)
        torch.testing.assert_close(from_logits, from_logprobs, atol=1e-5, rtol=1e-5)


def test_eq11_by_hand():
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    delta = torch.tensor([[0.0, 1.0, -1.0]])
    out = antidistillation_logits(logits, delta, lam=2.0, tau=0.5)
    expected = torch.tensor([[math.log(0.5) / 0.5, math.log(0.25) / 0.5 + 2.0, math.log(0.25) / 0.5 - 2.0]])
    torch.testing.assert_close(out, expected)


def test_temperature_scales_teacher_term_only():
    """eq. 11, not the authors' (log p + λΔ)/τ: doubling τ must leave λΔ̂ untouched."""
    logits = torch.randn(3, 7)
    delta = torch.randn(3, 7)
    a = antidistillation_logits(logits, delta, lam=1.5, tau=1.0)
    b = antidistillation_logits(logits, delta, lam=1.5, tau=2.0)
    torch.testing.assert_close(b - 1.5 * delta, (a - 1.5 * delta) / 2.0)


@settings(max_examples=30, deadline=None)
@given(tau=st.floats(0.05, 5.0), seed=st.integers(0, 1000))
def test_lambda_zero_is_temperature_sampling(tau, seed):
    g = torch.Generator().manual_seed(seed)
    logits, delta = torch.randn(4, 11, generator=g) * 3, torch.randn(4, 11, generator=g) * 100
    p = torch.softmax(antidistillation_logits(logits, delta, lam=0.0, tau=tau), -1)
    torch.testing.assert_close(p, torch.softmax(logits / tau, -1), atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 5), v=st.integers(1, 40))
def test_permutation_keeps_abs_multiset_per_row(seed, b, v):
    delta = torch.randn(b, v, generator=torch.Generator().manual_seed(seed))
    out = permute_delta(delta, torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(out.abs().sort(-1).values, delta.abs().sort(-1).values, rtol=0, atol=0)
    # each row is either delta[perm] or -delta[perm]: its sorted values match one of the two
    for r in range(b):
        s = out[r].sort().values
        assert torch.equal(s, delta[r].sort().values) or torch.equal(s, (-delta[r]).sort().values)


def test_permutation_is_seeded_and_varies_per_row():
    delta = torch.arange(1, 41, dtype=torch.float32).repeat(6, 1)
    a = permute_delta(delta, torch.Generator().manual_seed(0))
    b = permute_delta(delta, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert len({tuple(r.abs().tolist()) for r in a}) == 6  # independent permutation per row
    signs = {float(torch.sign(r.sum())) for r in permute_delta(delta.repeat(10, 1), torch.Generator().manual_seed(1))}
    assert signs == {1.0, -1.0}


def test_sine_error():
    a = torch.tensor([1.0, 0.0])
    assert sine_error(a, a).item() == 0.0
    assert sine_error(a, -a).item() == 0.0
    assert sine_error(a, torch.tensor([0.0, 2.0])).item() == pytest.approx(1.0)
    assert sine_error(a, torch.tensor([1.0, 1.0])).item() == pytest.approx(math.sqrt(0.5))


def test_nonfinite_rows():
    x = torch.zeros(4, 3)
    x[1, 0] = float("nan")
    x[2, 2] = float("inf")
    x[3] = float("-inf")
    x[0, 1] = float("-inf")  # banned token: fine
    assert nonfinite_rows(x).tolist() == [False, True, True, True]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(eps=0.0), "eps=0.0"),
        (dict(eps=-1e-3), "eps=-0.001"),
        (dict(eps=float("nan")), "eps=nan"),
        (dict(difference="backward"), "difference='backward'"),
    ],
)
def test_fd_bad_args(kwargs, needle):
    args = dict(eps=1e-2, difference="central") | kwargs
    with pytest.raises(ValueError, match=needle):
        finite_difference_delta(torch.zeros(1, 2), torch.zeros(1, 2), **args)


@pytest.mark.parametrize("kwargs, needle", [(dict(tau=0.0), "tau=0.0"), (dict(tau=-1), "tau=-1"), (dict(lam=float("inf")), "lam=inf")])
def test_eq11_bad_args(kwargs, needle):
    args = dict(lam=1.0, tau=1.0) | kwargs
    with pytest.raises(ValueError, match=needle):
        antidistillation_logits(torch.zeros(1, 2), torch.zeros(1, 2), **args)
