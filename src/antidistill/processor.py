"""Logits processors for ``model.generate``: antidistillation sampling (eq. 11) and its permutation baseline.

How τ is passed
---------------
τ is given once, to the processor, which returns the finished eq. 11 scores
``log p_T/τ + λ·Δ̂``: the temperature scales the teacher term only. ``generate``'s own
temperature must therefore stay at 1. :func:`generate` does this for you and checks it::

    proc = AntidistillationLogitsProcessor(proxy, grad, lam=0.3, eps=1e-2, tau=0.9)
    out = antidistill.generate(teacher, **inputs, processor=proc, top_p=0.95)

``antidistill.generate`` raises ``ValueError`` if it is given a ``temperature`` other than the
processor's τ. A plain ``teacher.generate(**inputs, logits_processor=[proc], **proc.generate_kwargs())``
is equivalent; passing another ``temperature`` to ``model.generate`` itself cannot be detected (the
processor only sees the scores) and would scale both terms again, so prefer :func:`generate`.
Greedy decoding (``do_sample=False``) takes the argmax of eq. 11. Top-k/top-p apply afterwards, to
the eq. 11 scores, as usual. (The authors' code returns ``log p_T + λΔ̂`` and lets ``generate``'s
temperature divide both terms: not eq. 11.)

Non-finite values
-----------------
A row of eq. 11 scores that holds NaN or +inf, or is all −inf (bf16 overflow in the proxy, or an
extreme λ), is refused by the one non-finite rule (:func:`antidistill.functional.refuse_nonfinite`),
as in both servers: it is never sampled from the teacher instead. Its sequence may only end: the
row's scores allow only the end-of-sequence token, a ``RuntimeWarning`` is emitted, and the count is
kept in ``processor.n_refused_rows``. The other rows of the batch go on. NaN never reaches the sampler.
"""

from __future__ import annotations

import warnings

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from .functional import (
    antidistillation_logits,
    check_difference,
    check_eps,
    check_lam,
    check_proxy_weights,
    check_tau,
    permute_delta,
    refuse_nonfinite,
)
from .proxy import EnsembleDelta, ProxyDelta, is_proxy_sequence, prompt_attention_mask
from .tokenizer_compat import check_compatible_tokenizers


class AntidistillationLogitsProcessor(LogitsProcessor):
    """Sample from softmax(log p_T/τ + λ·Δ̂) (eq. 11), Δ̂ from a proxy and its gradient g.

    Args:
        proxy: the proxy student, a causal LM or a path to one. Must share the teacher's vocabulary.
            A list of K proxies is an ensemble: Δ̂ = Σ_k w_k Δ̂_k (:class:`~antidistill.proxy.EnsembleDelta`),
            with one ε and one difference mode for all.
        grad: g, a dict of tensors, a :class:`~antidistill.ProxyGradient` or a ``.safetensors`` path; for
            an ensemble, a list with one g per proxy, ``grad[k]`` taken on ``proxy[k]``.
        proxy_weights: an ensemble's weights w_k (default 1/K each): finite, ≥ 0, not all 0, normalised
            to sum 1. Only with a list of proxies.
        lam: λ, any finite number; 0 gives plain temperature sampling (the proxy is then not run).
        eps: ε > 0 of the finite difference.
        tau: τ > 0, the teacher temperature of eq. 11, applied by the processor (see module doc).
        difference: ``"central"`` (the authors'), ``"forward"`` (eq. 10) or ``"jvp"`` (exact, eq. 12-13).
        pad_token_id: the id ``generate`` pads with (default: ``teacher_tokenizer``'s). Used only when
            the prompt's attention mask is unknown: :func:`generate` hands the processor the mask it
            was given (and refuses a different ``pad_token_id``); a bare ``model.generate`` does not,
            and leading runs of this id then count as left padding (none when it is None).
        teacher_tokenizer, proxy_tokenizer: if both are given, they must be compatible
            (:func:`~antidistill.tokenizer_compat.check_compatible_tokenizers`); for an ensemble,
            ``proxy_tokenizer`` may be one tokenizer per proxy.
        teacher_vocab_size: the teacher's output width, when it differs from the proxy's (Δ̂ is 0
            on rows past the proxy's, which no text uses).
        stop_ids: reasoning-only antidistillation. Token ids of the answer header (e.g. the ids of
            ``"**Final Answer**"``): in a row whose ids contain this sequence (anywhere, prompt
            included), λ is 0 from the token after it on, so the delivered answer comes from the
            teacher alone at τ. ``None`` (default): λ applies to every token.
    """

    def __init__(
        self,
        proxy,
        grad,
        *,
        lam: float,
        eps: float,
        tau: float,
        difference: str = "central",
        pad_token_id: int | None = None,
        teacher_tokenizer=None,
        proxy_tokenizer=None,
        stop_ids=None,
        eos_token_id=None,
        teacher_vocab_size: int | None = None,
        proxy_weights=None,
    ):
        check_lam(lam)
        check_eps(eps)
        check_tau(tau)
        check_difference(difference)
        ensemble = is_proxy_sequence(proxy)
        if not ensemble and (is_proxy_sequence(grad) or proxy_weights is not None):
            raise ValueError("grad and proxy_weights take lists only with a list of proxies: got one proxy and "
                             f"{'a list of gradients' if is_proxy_sequence(grad) else 'proxy_weights'}")
        if teacher_tokenizer is not None and proxy_tokenizer is not None:
            for ptok in (proxy_tokenizer if is_proxy_sequence(proxy_tokenizer) else [proxy_tokenizer]):
                check_compatible_tokenizers(teacher_tokenizer, ptok)
        if pad_token_id is None and teacher_tokenizer is not None:
            pad_token_id = teacher_tokenizer.pad_token_id
        self.lam = float(lam)
        self.eps = float(eps)
        self.tau = float(tau)
        self.difference = difference
        self.pad_token_id = pad_token_id
        self.prompt_mask: torch.Tensor | None = None  # (B, L0): set by generate() for one call
        if ensemble and not proxy:
            raise ValueError("proxy is an empty list: give at least one proxy")
        self.n_proxies = len(proxy) if ensemble else 1
        if ensemble and (not is_proxy_sequence(grad) or len(grad) != len(proxy)):
            n = f"{len(grad)} gradient(s)" if is_proxy_sequence(grad) else "one gradient not in a list"
            raise ValueError(f"grad must hold one gradient per proxy: {len(proxy)} proxies, {n}")
        if self.n_proxies > 1:
            self.proxy_delta = EnsembleDelta(proxy, grad, eps=eps, difference=difference, proxy_weights=proxy_weights,
                                             pad_token_id=pad_token_id, vocab_size=teacher_vocab_size)
        else:  # one proxy (a list of one is that proxy: its only weight normalises to 1)
            if ensemble:
                check_proxy_weights(proxy_weights, 1)
                proxy, grad = proxy[0], grad[0]
            self.proxy_delta = ProxyDelta(proxy, grad, eps=eps, difference=difference, pad_token_id=pad_token_id,
                                          vocab_size=teacher_vocab_size)
        self.vocab_size = self.proxy_delta.vocab_size
        if eos_token_id is None and teacher_tokenizer is not None:
            eos_token_id = teacher_tokenizer.eos_token_id
        if eos_token_id is None:
            eos_token_id = getattr(self.proxy_delta.config, "eos_token_id", None)
        self.eos_ids = [] if eos_token_id is None else [int(e) for e in torch.as_tensor(eos_token_id).flatten()]
        self.n_refused_rows = 0
        self._temperature = TemperatureLogitsWarper(self.tau)
        self.stop_ids = None if stop_ids is None else torch.as_tensor(list(stop_ids), dtype=torch.long)
        if self.stop_ids is not None and self.stop_ids.numel() == 0:
            raise ValueError("stop_ids must hold at least one token id (or be None)")

    @classmethod
    def from_settings(cls, proxy, grad, settings, **kwargs):
        """Build from :class:`~antidistill.SamplingSettings` (λ, ε, τ and the difference mode)."""
        return cls(
            proxy, grad, lam=settings.lam, eps=settings.eps, tau=settings.tau, difference=settings.difference, **kwargs
        )

    def generate_kwargs(self, top_p: float = 1.0, top_k: int = 0) -> dict:
        """Sampling arguments for ``model.generate``: the processor applies τ, so ``generate``'s stays 1."""
        return {"do_sample": True, "temperature": 1.0, "top_k": top_k, "top_p": top_p}

    def reset(self) -> None:
        """Drop the proxy's KV caches (done automatically when a new batch starts)."""
        self.proxy_delta.reset()

    def compute_delta(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids → ``(B, V)`` Δ̂ used in eq. 11."""
        return self.proxy_delta(input_ids, self.attention_mask(input_ids))

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``(B, L)`` mask of ``input_ids``: the prompt's mask from :func:`generate`, ones after it; None
        when no mask was handed over (or it belongs to another batch)."""
        return prompt_attention_mask(self.prompt_mask, input_ids)

    def adjusted_logits(self, input_ids: torch.Tensor, scores: torch.Tensor, tau=None) -> torch.Tensor:
        """``(B, V)`` final eq. 11 logits log p_T/τ + λΔ̂; a non-finite row is refused (EOS only).

        ``tau`` defaults to the processor's τ; a ``(B,)`` tensor gives each row its own τ.
        """
        return self._eq11(input_ids, scores, self.tau if tau is None else tau, times_tau=False)

    def _eq11(self, input_ids, scores, tau, *, times_tau: bool) -> torch.Tensor:
        if scores.shape[-1] != self.vocab_size:
            raise ValueError(
                f"teacher vocabulary size {scores.shape[-1]} differs from proxy vocabulary size {self.vocab_size}: "
                "antidistillation needs a proxy that shares the teacher's tokenizer"
            )
        delta = None if self.lam == 0.0 else self.compute_delta(input_ids).to(scores.device)
        adjusted = antidistillation_logits(scores, delta, self.lam, tau, times_tau=times_tau)
        adjusted, refused = refuse_nonfinite(adjusted, self.eos_ids)
        if refused.any():
            n = int(refused.sum())
            self.n_refused_rows += n
            warnings.warn(
                f"non-finite antidistillation scores in {n} row(s) (lam={self.lam}, eps={self.eps}); "
                "those rows are refused and end with end-of-sequence (never sampled from the teacher)",
                RuntimeWarning,
                stacklevel=3,
            )
        return adjusted

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``(B, V)`` eq. 11 scores; the input is never modified."""
        if self.lam == 0.0:
            if scores.shape[-1] != self.vocab_size:
                self.adjusted_logits(input_ids, scores)  # raises the vocabulary error
            return self._temperature(input_ids, scores)  # exactly temperature sampling (eq. 1)
        # eq. 11 as temperature τ applied to τ·eq. 11 = log p_T + τλΔ̂: the same float operations as
        # transformers' temperature sampling of those scores, so λ = 0 is bit-identical to it.
        out = self._temperature(input_ids, self._eq11(input_ids, scores, self.tau, times_tau=True).to(scores.dtype))
        if self.stop_ids is not None:
            done = self.after_stop(input_ids)
            if done.any():  # reasoning-only: these rows sample from the teacher alone (λ = 0)
                out = torch.where(done[:, None].to(out.device), self._temperature(input_ids, scores), out)
        return out

    def after_stop(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: the rows whose ids contain ``stop_ids`` (reasoning-only mode; all False otherwise)."""
        k = 0 if self.stop_ids is None else self.stop_ids.numel()
        if k == 0 or input_ids.shape[1] < k:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        windows = input_ids.unfold(1, k, 1)  # (B, L-k+1, k)
        return (windows == self.stop_ids.to(input_ids.device)).all(-1).any(-1)


class PermutationLogitsProcessor(AntidistillationLogitsProcessor):
    """The appendix-A control: eq. 11 with Δ̂ permuted and sign-flipped per token and per row.

    Same arguments as :class:`AntidistillationLogitsProcessor`, plus ``seed`` for the
    ``torch.Generator`` that draws the permutations (or an explicit ``generator``).
    """

    def __init__(self, proxy, grad, *, lam, eps, tau, difference="central", seed: int = 0, generator=None, **kwargs):
        super().__init__(proxy, grad, lam=lam, eps=eps, tau=tau, difference=difference, **kwargs)
        if generator is None:
            generator = torch.Generator(device=self.proxy_delta.device).manual_seed(int(seed))
        self.generator = generator

    def compute_delta(self, input_ids: torch.Tensor) -> torch.Tensor:
        return permute_delta(self.proxy_delta(input_ids, self.attention_mask(input_ids)), self.generator)



def generate(model, *args, processor: AntidistillationLogitsProcessor, logits_processor=None, **kwargs):
    """``model.generate`` with antidistillation sampling, τ given once (by the processor).

    Sampling defaults to ``do_sample=True, top_k=0, top_p=1.0``; any ``generate`` argument may be
    passed. ``logits_processor`` entries run before the antidistillation processor. The
    ``attention_mask`` given here is handed to the processor, so the proxy masks exactly the
    padding the teacher masks.

    Raises:
        ValueError: ``temperature`` is given and differs from ``processor.tau`` (eq. 11 has one τ,
            and it scales the teacher term only); ``pad_token_id`` is given and differs from the
            processor's.
    """
    temperature = kwargs.pop("temperature", None)
    if temperature is not None and abs(float(temperature) - processor.tau) > 1e-12 * max(1.0, processor.tau):
        raise ValueError(
            f"generate(temperature={temperature}) does not match the processor's tau={processor.tau}: "
            "eq. 11 has one τ, given to the processor; leave temperature out"
        )
    pad = kwargs.get("pad_token_id")
    if pad is not None and processor.pad_token_id is not None and int(pad) != processor.pad_token_id:
        raise ValueError(f"generate(pad_token_id={pad}) does not match the processor's "
                         f"pad_token_id={processor.pad_token_id}: give both the same padding id")
    procs = LogitsProcessorList([*(logits_processor or []), processor])
    processor.prompt_mask = kwargs.get("attention_mask")
    try:
        return model.generate(*args, logits_processor=procs, **(processor.generate_kwargs() | kwargs))
    finally:
        processor.prompt_mask = None
