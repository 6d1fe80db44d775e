"""Proxy-logit mixing for ``model.generate``: the "product of experts" baseline of the Distillation Game
(Allouah et al., arXiv 2605.22737).

The teacher samples from softmax(((1−γ)·log p_T + γ·log p_P)/τ)
(:func:`~antidistill.functional.proxy_mix_logits`): the proxy's next-token distribution is mixed into
the teacher's, with no gradient and no finite difference. It asks whether *any* proxy-shaped
perturbation of the teacher poisons distillation as well as antidistillation's Δ̂ does, at the same
teacher accuracy.

τ is given once, to the processor, exactly as for :class:`~antidistill.AntidistillationLogitsProcessor`
(see :mod:`antidistill.processor`): :func:`antidistill.generate` takes either processor. Top-k/top-p
apply afterwards, to the mixed scores. A row of mixed scores that cannot be sampled (NaN or +inf from
the proxy, or nothing left) is refused by the one non-finite rule
(:func:`~antidistill.functional.refuse_nonfinite`): it may only end with end-of-sequence.
"""

from __future__ import annotations

import copy
import warnings

import torch
from transformers import DynamicCache, LogitsProcessor, TemperatureLogitsWarper

from .functional import check_gamma, check_tau, proxy_mix_logits, refuse_nonfinite
from .proxy import cache_kwarg, left_padding_mask, load_causal_lm, position_ids, prompt_attention_mask, to_width
from .tokenizer_compat import check_compatible_tokenizers


class ProxyLogits:
    """The proxy's next-token log-probabilities at the last position of each row, with its own KV cache.

    Called with the ``(B, L)`` ids of a growing batch, like :class:`~antidistill.proxy.ProxyDelta`: when
    a call's ids extend those of the previous call, only the new tokens are run; otherwise the cache is
    reset and the prompt prefilled. Padding is the caller's: ``attention_mask`` on a prefill, else
    leading runs of ``pad_token_id`` are left padding; positions count from each row's first real token.

    Args:
        proxy: a causal LM or a path to one. A model in training mode is copied (its mode is kept).
        pad_token_id: the caller's padding id (used only without a mask).
        vocab_size: the teacher's output width: the proxy's log-probs are cut to it, or padded with −inf
            (the proxy gives a token it does not have no mass). Default: the proxy's width.
    """

    def __init__(self, proxy, *, pad_token_id: int | None = None, vocab_size: int | None = None):
        model = load_causal_lm(proxy)
        if isinstance(proxy, torch.nn.Module) and model.training:
            model = copy.deepcopy(model)
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.proxy_vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.vocab_size = self.proxy_vocab_size if vocab_size is None else int(vocab_size)
        self._cache_kw = cache_kwarg(self.model)
        self.reset()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        """Forget the cached prefix; the next call prefills from scratch."""
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._cache = None

    def _plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self._ids
        if (prev is not None and prev.shape[0] == input_ids.shape[0] and prev.shape[1] < input_ids.shape[1]
                and torch.equal(input_ids[:, : prev.shape[1]], prev)):
            n_new = input_ids.shape[1] - prev.shape[1]
            return input_ids[:, prev.shape[1]:], torch.cat([self._mask, self._mask.new_ones(len(input_ids), n_new)], 1)
        self.reset()
        if attention_mask is None:
            return input_ids, left_padding_mask(input_ids, self.pad_token_id)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: they must match")
        return input_ids, attention_mask.to(input_ids.device).long()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` long ids (and, on a prefill, their ``(B, L)`` mask) → ``(B, V)`` float32 log p_P of the
        token after position L (V: ``vocab_size``)."""
        input_ids = input_ids.to(self.device)
        new, mask = self._plan(input_ids, attention_mask)
        cache = self._cache or DynamicCache(config=self.model.config)
        out = self.model(input_ids=new, attention_mask=mask, position_ids=position_ids(mask)[:, -new.shape[1]:],
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        self._cache, self._ids, self._mask = cache, input_ids, mask
        return to_width(torch.log_softmax(out.logits[:, -1].float(), -1), self.vocab_size, float("-inf"))


class ProxyMixLogitsProcessor(LogitsProcessor):
    """Sample from softmax(((1−γ)·log p_T + γ·log p_P)/τ): the teacher mixed with a proxy, no gradient.

    Args:
        proxy: the proxy, a causal LM or a path to one. Reads the teacher's token ids.
        gamma: γ in [0, 1]. 0 is plain temperature sampling (the proxy is then not run); 1 samples the
            proxy's own temperature-τ distribution.
        tau: τ > 0, applied by the processor to both terms; ``generate``'s temperature stays 1.
        pad_token_id: the id ``generate`` pads with (default: ``teacher_tokenizer``'s), used only when the
            prompt's mask is unknown (:func:`antidistill.generate` hands it over).
        teacher_tokenizer, proxy_tokenizer: if both are given, they must be compatible.
        eos_token_id: the ids a refused row may end with (default: the teacher tokenizer's, else the proxy's).
        teacher_vocab_size: the teacher's output width, when it differs from the proxy's.

    Example:
        >>> proc = ProxyMixLogitsProcessor(proxy, gamma=0.3, tau=0.9, teacher_tokenizer=tok)  # doctest: +SKIP
        >>> out = antidistill.generate(teacher, **tok(prompts, return_tensors="pt", padding=True),
        ...                            processor=proc, top_p=0.95)  # doctest: +SKIP
    """

    def __init__(self, proxy, *, gamma: float, tau: float, pad_token_id: int | None = None, teacher_tokenizer=None,
                 proxy_tokenizer=None, eos_token_id=None, teacher_vocab_size: int | None = None):
        check_gamma(gamma)
        check_tau(tau)
        if teacher_tokenizer is not None and proxy_tokenizer is not None:
            check_compatible_tokenizers(teacher_tokenizer, proxy_tokenizer)
        if pad_token_id is None and teacher_tokenizer is not None:
            pad_token_id = teacher_tokenizer.pad_token_id
        self.gamma, self.tau, self.pad_token_id = float(gamma), float(tau), pad_token_id
        self.prompt_mask: torch.Tensor | None = None  # (B, L0): set by antidistill.generate for one call
        self.proxy_logits = ProxyLogits(proxy, pad_token_id=pad_token_id, vocab_size=teacher_vocab_size)
        self.vocab_size = self.proxy_logits.vocab_size
        if eos_token_id is None and teacher_tokenizer is not None:
            eos_token_id = teacher_tokenizer.eos_token_id
        if eos_token_id is None:
            eos_token_id = getattr(self.proxy_logits.model.config, "eos_token_id", None)
        self.eos_ids = [] if eos_token_id is None else [int(e) for e in torch.as_tensor(eos_token_id).flatten()]
        self.n_refused_rows = 0
        self._temperature = TemperatureLogitsWarper(self.tau)

    def generate_kwargs(self, top_p: float = 1.0, top_k: int = 0) -> dict:
        """Sampling arguments for ``model.generate``: the processor applies τ, so ``generate``'s stays 1."""
        return {"do_sample": True, "temperature": 1.0, "top_k": top_k, "top_p": top_p}

    def reset(self) -> None:
        """Drop the proxy's KV cache (done automatically when a new batch starts)."""
        self.proxy_logits.reset()

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``(B, L)`` mask of ``input_ids``: the prompt's mask from :func:`antidistill.generate`, ones after
        it; None when none was handed over (or it belongs to another batch)."""
        return prompt_attention_mask(self.prompt_mask, input_ids)

    def adjusted_logits(self, input_ids: torch.Tensor, scores: torch.Tensor, tau=None) -> torch.Tensor:
        """``(B, V)`` mixed scores ((1−γ)·log p_T + γ·log p_P)/τ; a non-finite row is refused (EOS only)."""
        return self._mixed(input_ids, scores, self.tau if tau is None else tau, times_tau=False)

    def _mixed(self, input_ids, scores, tau, *, times_tau: bool) -> torch.Tensor:
        if scores.shape[-1] != self.vocab_size:
            raise ValueError(f"teacher vocabulary size {scores.shape[-1]} differs from the processor's "
                             f"{self.vocab_size}: pass teacher_vocab_size, or use a proxy that shares the teacher's "
                             "tokenizer")
        proxy = None if self.gamma == 0.0 else self.proxy_logits(input_ids, self.attention_mask(input_ids))
        mixed = proxy_mix_logits(scores, None if proxy is None else proxy.to(scores.device), self.gamma, tau,
                                 times_tau=times_tau)
        mixed, refused = refuse_nonfinite(mixed, self.eos_ids)
        if refused.any():
            n = int(refused.sum())
            self.n_refused_rows += n
            warnings.warn(f"non-finite mixed scores in {n} row(s) (gamma={self.gamma}); those rows are refused and "
                          "end with end-of-sequence (never sampled from the teacher)", RuntimeWarning, stacklevel=3)
        return mixed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``(B, V)`` mixed scores at temperature τ; the input is never modified."""
        if self.gamma == 0.0:
            if scores.shape[-1] != self.vocab_size:
                self._mixed(input_ids, scores, self.tau, times_tau=True)  # raises the vocabulary error
            return self._temperature(input_ids, scores)  # exactly temperature sampling (eq. 1)
        # τ·(mixed scores), then temperature τ: the float operations of transformers' temperature sampling
        return self._temperature(input_ids, self._mixed(input_ids, scores, self.tau, times_tau=True).to(scores.dtype))
