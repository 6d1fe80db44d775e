"""The mathematics of antidistillation sampling, as pure tensor functions.

Nothing here touches a model: the logits processors, the server and the finite-difference
check call these, and tests can check them against hand-computed values. Equation numbers
refer to Savani et al., "Antidistillation Sampling" (see ``docs/design.md``).

Shapes: ``B`` is the batch, ``V`` the vocabulary.
"""

from __future__ import annotations

import math

import torch

DIFFERENCES = ("central", "forward", "jvp")


def finite_difference_delta(
    logits_plus: torch.Tensor,
    logits_other: torch.Tensor,
    eps: float,
    difference: str = "central",
) -> torch.Tensor:
    """Finite-difference estimate Δ̂ of the directional derivative ⟨∇θ log p(x), g⟩ (eq. 8-10).

    Args:
        logits_plus: ``(B, V)`` logits (or log-probs) of the proxy at θ + εg.
        logits_other: ``(B, V)`` logits (or log-probs) at θ − εg (``"central"``) or at θ (``"forward"``).
        eps: the step ε > 0.
        difference: ``"central"``: (log p(θ+εg) − log p(θ−εg)) / 2ε, the authors' form;
            ``"forward"``: (log p(θ+εg) − log p(θ)) / ε, eq. 10 as written.

    Returns:
        ``(B, V)`` float32 Δ̂ of the *log-probs*, whether logits or log-probs are passed.

    Numerics: log p₊ − log p₋ = d − log Σₓ p₋(x)·exp(d(x)) with d = z₊ − z₋ the logit difference.
    This equals the difference of two log-softmaxes but never subtracts two large log-sum-exps,
    so fp32 round-off, amplified by 1/ε, stays near that of the logits themselves.
    """
    check_eps(eps)
    if logits_plus.shape != logits_other.shape:
        raise ValueError(
            f"logits_plus {tuple(logits_plus.shape)} and logits_other {tuple(logits_other.shape)} differ in shape"
        )
    other = logits_other.float()
    d = logits_plus.float() - other
    shift = torch.logsumexp(torch.log_softmax(other, dim=-1) + d, dim=-1, keepdim=True)
    diff = d - shift
    if difference == "central":
        return diff / (2.0 * eps)
    if difference == "forward":
        return diff / eps
    raise ValueError(f"difference={difference!r} has no finite-difference form; use 'central' or 'forward'")


def ensemble_delta(deltas, weights=None) -> torch.Tensor:
    """Δ̂ of an ensemble of K proxies: Σ_k w_k Δ̂_k, the Δ̂ that eq. 11 then takes.

    Each Δ̂_k estimates ⟨∇θ log p(x; θ_k), g_k⟩ (eq. 8-10 or 12-13) with proxy k's own θ_k and
    g_k = ∇θ ℓ(θ_k) (eq. 7): the sum is the weighted mean of the proxies' first-order effects (eq. 6).

    Args:
        deltas: a sequence of K ``(B, V)`` tensors (one per proxy, all the same shape).
        weights: None (1/K each) or K finite numbers ≥ 0, not all 0; normalised to sum 1
            (:func:`check_proxy_weights`), so λ keeps its scale whatever K is. A weight of 0
            contributes nothing, not even a non-finite value.

    Returns:
        ``(B, V)`` float32 Σ_k w_k Δ̂_k. With K = 1 this is Δ̂_1 itself, bit for bit.

    Example:
        >>> ensemble_delta([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])], [1, 3]).tolist()
        [[0.25, 2.25]]
    """
    deltas = list(deltas)
    w = check_proxy_weights(weights, len(deltas))
    for k, d in enumerate(deltas):
        if d.shape != deltas[0].shape:
            raise ValueError(f"deltas[{k}] has shape {tuple(d.shape)}, deltas[0] {tuple(deltas[0].shape)}: every "
                             "proxy's delta must cover the same rows and vocabulary")
    out = None
    for wk, d in zip(w, deltas):
        if wk == 0.0:
            continue
        term = d.float() if wk == 1.0 else wk * d.float()
        out = term if out is None else out + term.to(out.device)
    return out


def antidistillation_logits(
    teacher_logits: torch.Tensor,
    delta: torch.Tensor | None,
    lam: float,
    tau: float | torch.Tensor,
    *,
    times_tau: bool = False,
    proxy_weights=None,
) -> torch.Tensor:
    """Adjusted logits of antidistillation sampling (eq. 11): the one place eq. 11 is assembled.

    ``log p_T(x)/τ + λ·Δ̂(x)``: the temperature scales the teacher term only. Its softmax is the
    distribution the next token is drawn from. Every engine calls this: the transformers processor,
    the embedded server (:func:`sampling_logprobs`) and both vLLM paths.

    Args:
        teacher_logits: ``(B, V)`` teacher logits (any per-row shift; they are log-softmaxed here).
        delta: ``(B, V)`` Δ̂ from :func:`finite_difference_delta` or a JVP, or None when λ = 0; or a
            sequence of K such tensors, one per proxy of an ensemble, combined by :func:`ensemble_delta`.
        lam: λ, finite.
        tau: τ > 0, a float or a ``(B,)`` tensor (one τ per row, as a server batching requests needs).
        times_tau: return τ·eq. 11 = ``log p_T + τλ·Δ̂`` instead, for samplers that divide the
            scores by the temperature τ themselves (transformers' ``TemperatureLogitsWarper``,
            vLLM's sampler). Its softmax at temperature τ is eq. 11.
        proxy_weights: the ensemble's weights when ``delta`` is a sequence (default 1/K each).

    Returns:
        ``(B, V)`` float32 adjusted logits. With λ = 0 this is eq. 1, plain temperature sampling.

    Example:
        >>> z = antidistillation_logits(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, -1.0]]), 0.5, 2.0)
        >>> torch.softmax(z, -1).argmax().item()
        0
    """
    check_lam(lam)
    if isinstance(tau, torch.Tensor):
        if tau.shape != teacher_logits.shape[:1] or not bool(torch.isfinite(tau).all() and (tau > 0).all()):
            raise ValueError(f"tau must be finite and > 0 with shape {tuple(teacher_logits.shape[:1])}, got {tau!r}")
        tau = tau.float()[:, None]
    else:
        check_tau(tau)
    if isinstance(delta, (list, tuple)):
        delta = ensemble_delta(delta, proxy_weights)
    elif proxy_weights is not None:
        raise ValueError("proxy_weights is given but delta is one tensor: pass one delta per proxy")
    if delta is None:
        if lam != 0.0:
            raise ValueError(f"delta is required when lam != 0 (lam={lam!r})")
    elif teacher_logits.shape != delta.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and delta {tuple(delta.shape)} differ in shape; "
            "teacher and proxy must share one vocabulary"
        )
    logp_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    if times_tau:
        return logp_t if delta is None else logp_t + (tau * lam) * delta.float()
    return logp_t / tau if delta is None else logp_t / tau + lam * delta.float()


def proxy_mix_logits(teacher_logits: torch.Tensor, proxy_logits: torch.Tensor | None, gamma: float,
                     tau: float | torch.Tensor, *, times_tau: bool = False) -> torch.Tensor:
    """Proxy-logit mixing, the "product of experts" baseline of the Distillation Game (arXiv 2605.22737).

    ``((1−γ)·log p_T(x) + γ·log p_P(x)) / τ``: softmax ∝ p_T^((1−γ)/τ)·p_P^(γ/τ), with no gradient and no
    finite difference. Each term is log-softmaxed, so per-row shifts cancel (the authors mix raw logits:
    the same distribution). Samplers apply it as they apply eq. 11: these scores, then top-k/top-p on
    them, then softmax. A −inf entry of either input (a banned token) stays −inf whatever its weight;
    NaN or +inf gives a row that :func:`refuse_nonfinite` refuses.

    Args:
        teacher_logits: ``(B, V)`` teacher logits.
        proxy_logits: ``(B, V)`` proxy logits on the same ids and vocabulary; may be None when γ = 0.
        gamma: γ in [0, 1]. 0: temperature-τ sampling of the teacher (eq. 1); 1: the proxy's at τ.
        tau: τ > 0, a float or a ``(B,)`` tensor.
        times_tau: return τ·(the scores), for samplers that divide by τ themselves.

    Returns:
        ``(B, V)`` float32 scores.

    Example:
        >>> t, p = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> torch.softmax(proxy_mix_logits(t, p, 0.5, 1.0), -1).tolist()
        [[0.5, 0.5]]
    """
    check_gamma(gamma)
    if gamma == 0.0:
        return antidistillation_logits(teacher_logits, None, 0.0, tau, times_tau=times_tau)
    if proxy_logits is None or proxy_logits.shape != teacher_logits.shape:
        raise ValueError(f"proxy_logits must have the teacher logits' shape {tuple(teacher_logits.shape)} when gamma "
                         f"!= 0 (gamma={gamma!r}), got {None if proxy_logits is None else tuple(proxy_logits.shape)}")
    logp_t = antidistillation_logits(teacher_logits, None, 0.0, tau, times_tau=True)  # log p_T; checks τ
    mixed = _weighted(logp_t, 1.0 - gamma) + _weighted(torch.log_softmax(proxy_logits.float(), -1), gamma)
    if times_tau:
        return mixed
    return mixed / (tau.float()[:, None] if isinstance(tau, torch.Tensor) else tau)


def _weighted(logp: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight·logp`` with −inf kept as −inf (a veto survives a weight of 0)."""
    return torch.where(torch.isneginf(logp), logp, logp * weight)


def permute_delta(delta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The permutation baseline of appendix A: shuffle Δ̂ within each row and flip each row's sign.

    The multiset of |Δ̂| of each row is kept, so the noise has Δ̂'s statistics but none of
    its gradient information.

    Args:
        delta: ``(B, V)``.
        generator: seeded ``torch.Generator`` on ``delta``'s device, for reproducibility.

    Returns:
        ``(B, V)``: row b is ``s_b · delta[b, π_b]`` with π_b a uniform random permutation and
        s_b = ±1 with probability 1/2, both drawn independently per row (and so per token).
    """
    b, v = delta.shape
    perm = torch.argsort(torch.rand(b, v, generator=generator, device=delta.device), dim=-1)
    sign = torch.randint(0, 2, (b, 1), generator=generator, device=delta.device).to(delta.dtype) * 2 - 1
    return torch.gather(delta, -1, perm) * sign


def sine_error(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sine of the angle between two vectors, the error measure of appendix B.1 (Fig. 7).

    Args:
        estimate, reference: ``(..., V)``; compared along the last axis in float64.

    Returns:
        ``(...)`` values in [0, 1]: sqrt(1 − cos²). 0 means parallel (or anti-parallel).
    """
    a, r = estimate.double(), reference.double()
    cos = (a * r).sum(-1) / (a.norm(dim=-1) * r.norm(dim=-1)).clamp_min(torch.finfo(torch.float64).tiny)
    return (1.0 - cos.clamp(-1.0, 1.0) ** 2).clamp_min(0.0).sqrt()


def completion_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of the labelled positions: the completion-only loss (eq. 7's ℓ, unnormalised).

    Args:
        logits: ``(B, L, V)`` a causal LM's logits for ``(B, L)`` ids.
        labels: ``(B, L)`` the ids, with ``-100`` wherever no loss is taken (prompt, padding).

    Returns:
        A float32 scalar: Σ −log p(labels[:, t+1] | ids[:, :t+1]) over positions with a label. Divide
        by the number of labelled targets for the mean NLL per completion token.
    """
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def nonfinite_rows(adjusted: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: rows of adjusted logits that cannot be sampled from.

    A row is bad when it holds a NaN or +inf (softmax would give NaN probabilities) or when
    every entry is −inf (nothing left to sample). A −inf entry alone is fine: other processors
    use it to ban tokens.
    """
    bad = torch.isnan(adjusted).any(-1) | torch.isposinf(adjusted).any(-1)
    return bad | torch.isneginf(adjusted).all(-1)


class NonFiniteScores(RuntimeError):
    """eq. 11 scores that cannot be sampled, and no end-of-sequence token to end their rows with."""


def refuse_nonfinite(scores: torch.Tensor, eos_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-finite rule, one for every engine: a row that cannot be sampled is refused.

    A row of eq. 11 scores with a NaN or +inf, or with every entry −inf (:func:`nonfinite_rows`:
    bf16 overflow in the proxy, an extreme λ), is never sampled and never replaced by the teacher's
    own distribution: that would hand out a raw-teacher sample. The row may only end. Its request
    ends there; the other rows of the batch go on. A server that can fail a request with an error
    does so (the embedded server answers ``nonfinite_scores``); a sampler that cannot (vLLM,
    ``model.generate``) samples the end-of-sequence token.

    Args:
        scores: ``(B, V)`` eq. 11 scores (or τ·eq. 11).
        eos_ids: the end-of-sequence token ids the refused rows may emit.

    Returns:
        ``(scores, refused)``: a new ``(B, V)`` tensor whose refused rows are 0 at ``eos_ids`` and −inf
        elsewhere (``scores`` itself is not modified), and the ``(B,)`` bool of refused rows.

    Raises:
        NonFiniteScores: a row is refused and ``eos_ids`` is empty.

    Example:
        >>> out, bad = refuse_nonfinite(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), [0])
        >>> bad.tolist(), out[1].tolist()
        ([False, True], [0.0, -inf])
    """
    bad = nonfinite_rows(scores)
    if not bool(bad.any()):
        return scores, bad
    eos = [int(e) for e in (eos_ids or [])]
    if not eos:
        raise NonFiniteScores(f"{int(bad.sum())} row(s) of eq. 11 scores are not finite and there is no "
                              "end-of-sequence id to end them with; the teacher is never the fallback")
    only_eos = torch.full_like(scores, float("-inf"))
    only_eos[:, eos] = 0.0
    return torch.where(bad[:, None], only_eos, scores), bad


# --- validation shared by every entry point (processor, settings, CLI, server) ---------------


def check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got eps={eps!r}")


def check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got tau={tau!r}")


def check_lam(lam: float) -> None:
    if not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got lam={lam!r}")


def check_gamma(gamma: float) -> None:
    if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got gamma={gamma!r}")


def check_proxy_weights(weights, n_proxies: int) -> tuple[float, ...]:
    """K ensemble weights (None: 1/K each), finite, ≥ 0, not all 0, returned normalised to sum 1."""
    if not isinstance(n_proxies, int) or n_proxies < 1:
        raise ValueError(f"an ensemble needs at least one proxy, got {n_proxies!r}")
    if weights is None:
        return (1.0 / n_proxies,) * n_proxies
    weights = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(weights) != n_proxies:
        raise ValueError(f"proxy_weights has {len(weights)} entries for {n_proxies} proxies: give one per proxy")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"proxy_weights must be finite numbers >= 0, got proxy_weights={weights!r}")
    if sum(weights) <= 0:
        raise ValueError(f"proxy_weights must not all be 0, got proxy_weights={weights!r}")
    return tuple(float(w) / float(sum(weights)) for w in weights)


def check_difference(difference: str) -> None:
    if difference not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got difference={difference!r}")
