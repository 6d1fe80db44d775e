"""The transfer score: does a proxy's Δ̂ order the tokens the way a candidate student's Δ̂ does?

Antidistillation sampling (eq. 11) reweights the teacher's tokens by exp(λ·Δ̂): a proxy protects
against a student to the extent that the tokens it pushes down are the ones that would help *that*
student. The transfer score measures this without distilling anything. At holdout-trace positions,
over the tokens that carry the teacher's sampling mass (its top-p nucleus), it rank-correlates the
proxy's Δ̂ (with the proxy's g) and the student's Δ̂ (with the student's own g on the same traces).

Why Spearman's ρ, not Kendall's τ or a Pearson correlation of the values:

* ranks, not values: each model's Δ̂ has its own scale (its g's norm, its size), and λ is calibrated
  per proxy, so only the ordering of the nucleus tokens is comparable between models;
* Spearman rather than Kendall: both are rank correlations with the same null mean 0; ρ is a Pearson
  correlation of ranks, O(n log n) and written with ``argsort`` alone, and under independence its
  variance is exactly 1/(n − 1) for n tokens, which gives a plain standard error for the mean over
  positions. ρ also weighs a token moved far in the order more than one moved next door, which is
  what matters when a few tokens carry most of the reweighting.

Shapes: ``N`` positions, ``V`` the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import top_p_filter

NUCLEUS_TOP_P = 0.95
MIN_NUCLEUS = 2


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, tied values sharing the mean of their ranks (``scipy.stats.rankdata``).

    Args:
        x: ``(n,)`` finite values.

    Returns:
        ``(n,)`` float64 ranks.

    Example:
        >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # the last 1-based rank of each group of ties
    group_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    ranks[order] = group_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two ``(n,)`` tensors: Pearson's correlation of their average ranks.

    Returns NaN when n < 2 or either side is constant (ρ is undefined there, as in scipy).
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"spearman needs two 1-D tensors of one length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    if denom == 0.0:
        return float("nan")
    return float(((ra * rb).sum() / denom).clamp(-1.0, 1.0))


def nucleus_mask(teacher_logprobs: torch.Tensor, top_p: float = NUCLEUS_TOP_P) -> torch.Tensor:
    """``(N, V)`` bool: the teacher's top-p nucleus at each position (the tokens sampling can draw).

    The smallest set of most likely tokens whose probability reaches ``top_p``, as
    :func:`~antidistill.sampling.top_p_filter` cuts it (the most likely token is always in).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got top_p={top_p!r}")
    n = teacher_logprobs.shape[0]
    kept = top_p_filter(teacher_logprobs.float(), torch.full((n,), float(top_p), device=teacher_logprobs.device))
    return torch.isfinite(kept)


@dataclass(frozen=True)
class PositionAgreement:
    """Per-position rank agreement of two Δ̂s over the teacher's nucleus.

    Attributes:
        rho: ``(N,)`` float64 Spearman ρ per position; NaN where the position was skipped.
        nucleus_size: ``(N,)`` long, the number of nucleus tokens at each position.
        used: ``(N,)`` bool, the positions that count: in ``mask``, at least :data:`MIN_NUCLEUS`
            nucleus tokens, and neither Δ̂ constant over them.
    """

    rho: torch.Tensor
    nucleus_size: torch.Tensor
    used: torch.Tensor

    @property
    def score(self) -> float:
        """The transfer score: mean ρ over the used positions (NaN if none is used)."""
        return float(self.rho[self.used].mean()) if bool(self.used.any()) else float("nan")

    @property
    def n_used(self) -> int:
        return int(self.used.sum())


def position_agreement(
    delta_proxy: torch.Tensor,
    delta_student: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    top_p: float = NUCLEUS_TOP_P,
) -> PositionAgreement:
    """Spearman ρ between the proxy's and the student's Δ̂ over the teacher's nucleus, position by position.

    Args:
        delta_proxy: ``(N, V)`` the proxy's Δ̂ (eq. 8-10 or eq. 12-13, with the proxy's g).
        delta_student: ``(N, V)`` the candidate student's Δ̂, with *its own* g on the same traces.
        teacher_logprobs: ``(N, V)`` the teacher's next-token log-probs (or logits) at those positions.
        mask: ``(N,)`` bool, the positions to score (e.g. completion tokens, not the prompt or padding);
            default all.
        top_p: the nucleus mass (0.95, the top-p the authors sample with).

    Returns:
        :class:`PositionAgreement`; positions with fewer than 2 nucleus tokens (the teacher is nearly
        sure: no order to agree on) or a constant Δ̂ over the nucleus are skipped.
    """
    if delta_proxy.shape != delta_student.shape or delta_proxy.shape != teacher_logprobs.shape:
        raise ValueError(f"delta_proxy {tuple(delta_proxy.shape)}, delta_student {tuple(delta_student.shape)} and "
                         f"teacher_logprobs {tuple(teacher_logprobs.shape)} must share one (N, V) shape")
    if delta_proxy.dim() != 2:
        raise ValueError(f"expected (N, V) tensors, got shape {tuple(delta_proxy.shape)}")
    n = delta_proxy.shape[0]
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=delta_proxy.device)
    elif mask.shape != (n,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({n},)")
    nucleus = nucleus_mask(teacher_logprobs, top_p)
    size = nucleus.sum(-1)
    rho = torch.full((n,), float("nan"), dtype=torch.float64)
    for i in torch.nonzero(mask.bool() & (size >= MIN_NUCLEUS)).flatten().tolist():
        rho[i] = spearman(delta_proxy[i][nucleus[i]].double(), delta_student[i][nucleus[i]].double())
    return PositionAgreement(rho=rho, nucleus_size=size.cpu(), used=~torch.isnan(rho))


def bootstrap_mean_interval(
    values: torch.Tensor, groups: torch.Tensor, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the pooled mean of ``values``, resampling whole groups (traces) with replacement.

    Positions of one trace are not independent, so the trace is the unit that is resampled.

    Args:
        values: ``(M,)`` finite values (the used positions' ρ).
        groups: ``(M,)`` long, each value's group (its trace).
        n_boot: bootstrap replicates; level: the interval's coverage; seed: the generator's seed.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when there are no values.
    """
    if values.shape != groups.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and groups {tuple(groups.shape)} must be one 1-D shape")
    if values.numel() == 0:
        return float("nan"), float("nan")
    _, g = torch.unique(groups, return_inverse=True)
    k = int(g.max()) + 1
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, g, values.double())
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, g, torch.ones_like(values, dtype=torch.float64))
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, k, (n_boot, k), generator=gen)
    means = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1.0 - level) / 2
    q = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])
