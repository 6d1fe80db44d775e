"""Sampling as a server does it: eq. 11 with per-row flattening, per-row top-p and per-row seeds.

The embedded server's engine samples each row from :func:`sampling_logprobs`; the transfer score
takes the teacher's nucleus from :func:`top_p_filter`. The eq. 11 assembly itself is
:func:`antidistill.functional.antidistillation_logits`.

Shapes: ``B`` is the batch, ``V`` the vocabulary.
"""

from __future__ import annotations

import torch

from .functional import antidistillation_logits, nonfinite_rows

def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering, one ``p`` per row.

    Args:
        logits: ``(B, V)`` logits (any per-row shift).
        top_p: ``(B,)`` values in (0, 1].

    Returns:
        ``(B, V)``: ``logits`` with every token outside its row's nucleus set to −inf. The nucleus
        is the smallest set of most likely tokens whose probability reaches ``top_p``; the most
        likely token is always kept. Rows with ``top_p >= 1`` are returned unchanged.
    """
    if bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    remove = (probs.cumsum(-1) - probs) >= top_p[:, None].to(probs.dtype)
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter(-1, idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def flattening(tau: float | torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``(B,)`` factor min(1, τ/T) applied to the whole eq. 11 logit.

    A request temperature T ≥ τ samples q^(τ/T) (a flattening of eq. 11's q); any T < τ, including
    0, samples q itself. No request temperature changes the teacher term alone, so no pair of
    temperatures separates log p_T from λΔ̂ (see ``docs/serving.md``).

    Args:
        tau: the operator's τ > 0, a float or ``(B,)``.
        temperature: ``(B,)`` request temperatures ≥ 0.
    """
    t = temperature.float()
    tau = tau.float() if isinstance(tau, torch.Tensor) else torch.full_like(t, float(tau))
    return torch.where(t > tau, tau / t.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(t))


def sampling_logprobs(
    teacher_logits: torch.Tensor,
    delta: torch.Tensor | None,
    lam: float,
    tau: float | torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probabilities a defended server actually samples from, row by row.

    ``z = log p_T/τ + λ·Δ̂`` (eq. 11, the operator's λ and τ), then ``z·min(1, τ/T)`` (see
    :func:`flattening`), then top-p, then log-softmax.

    Args:
        teacher_logits: ``(B, V)`` teacher logits.
        delta: ``(B, V)`` Δ̂, or None when λ = 0 (eq. 1: plain temperature-τ sampling).
        lam: λ, finite.
        tau: the operator's τ > 0 (float or ``(B,)``).
        temperature: ``(B,)`` request temperatures ≥ 0.
        top_p: ``(B,)`` in (0, 1].

    Returns:
        ``(logprobs, ok)``: ``(B, V)`` float32 log-probs (−inf outside the nucleus) and a ``(B,)``
        bool that is False for rows whose eq. 11 scores are not finite (:func:`nonfinite_rows`).
        Those rows are NaN: there is no fallback to the teacher; the caller must not sample them.
    """
    z = antidistillation_logits(teacher_logits, delta, lam, tau)
    ok = ~nonfinite_rows(z)
    z = z * flattening(tau, temperature.to(z.device))[:, None]
    z = torch.where(ok[:, None], z, torch.zeros_like(z))  # keep bad rows out of sort/softmax
    logprobs = torch.log_softmax(top_p_filter(z, top_p.to(z.device)), dim=-1)
    return torch.where(ok[:, None], logprobs, torch.full_like(logprobs, float("nan"))), ok


def row_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` for one request's ``seed`` (any int64; None: no generator)."""
    if seed is None:
        return None
    if not isinstance(seed, int) or not (-(2**63) <= seed < 2**63):
        raise ValueError(f"seed must be an integer in the int64 range, got seed={seed!r}")
    return torch.Generator(device=device).manual_seed(seed % 2**64)


def sample_rows(logprobs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """``(B,)`` long token ids, row b drawn from ``exp(logprobs[b])`` with ``generators[b]``.

    A seeded row's draw depends only on its own generator and its own row, never on the other
    rows of the batch, so a seeded request is reproducible whatever it is batched with. Rows with
    no generator share torch's default one.

    Args:
        logprobs: ``(B, V)`` finite-or-−inf log-probs, each row normalised.
        generators: ``B`` entries.
    """
    if len(generators) != logprobs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {logprobs.shape[0]} rows")
    probs = logprobs.float().exp()
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        out[free] = torch.multinomial(probs[free], 1).squeeze(-1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out
