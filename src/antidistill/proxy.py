"""Δ̂ over the whole vocabulary for the last position of each row, from a proxy and g.

:class:`ProxyDelta` is engine-agnostic: it takes the token ids seen so far and returns Δ̂ for
the next token. The transformers logits processors wrap it; ``slots`` keeps the same state per
request for a server's continuous batching.

Memory held, in proxy-sized weight buffers (P = proxy parameters) and KV caches:

============  ==========================================  ===================
difference    weights                                     KV caches
============  ==========================================  ===================
``central``   2 P: θ+εg and θ−εg                          2
``forward``   2 P: θ+εg, and θ (the proxy itself, shared)  2
``jvp``       2 P: θ (shared) and the tangent g            2 (primal, tangent)
============  ==========================================  ===================

For ``central``, if ``proxy`` is given as a path, θ+εg is built in the loaded model itself and
only θ−εg is a copy, so the total is 2 P. A model object passed in is never changed: the
perturbed models are copies (the caller may free the original), and ``forward``/``jvp`` share it
only when it is already in eval mode (and, for ``jvp``, on eager attention); otherwise they copy it. ``g`` itself is not kept by
the finite-difference modes.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call
from transformers import AutoModelForCausalLM, DynamicCache

from .functional import check_difference, check_eps, check_proxy_weights, ensemble_delta, finite_difference_delta
from .gradient import load_gradient, trainable_parameters


def load_causal_lm(model, dtype: torch.dtype | None = None, **kwargs):
    """A model object passes through; a path is loaded with ``AutoModelForCausalLM``."""
    if isinstance(model, torch.nn.Module):
        return model
    try:
        return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load a causal LM from {str(model)!r}: {e}") from e


def cache_kwarg(model) -> str:
    """``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (older), whichever ``forward`` takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def left_padding_mask(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """``(B, L)`` long mask: 0 for the leading run of ``pad_token_id`` in each row, 1 after.

    Left padding is the only padding a decoder-only batch has before generation; pads that
    ``generate`` appends after a row finishes are ordinary tokens to the teacher, and so to the proxy.
    """
    if pad_token_id is None:
        return torch.ones_like(input_ids)
    return (input_ids != pad_token_id).long().cummax(dim=-1).values


def prompt_attention_mask(prompt_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``(B, L)`` mask of a growing batch: the prompt's ``(B, L0)`` mask (as :func:`antidistill.generate` hands
    it to a processor), then ones for the generated tokens; None when there is none, or it belongs to
    another batch (another row count, or longer than ``input_ids``)."""
    m = prompt_mask
    if m is None or m.shape[0] != input_ids.shape[0] or m.shape[1] > input_ids.shape[1]:
        return None
    m = m.to(input_ids.device).long()
    return torch.cat([m, m.new_ones(m.shape[0], input_ids.shape[1] - m.shape[1])], dim=1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` position ids counted from each row's first real token (0 on left padding),
    as transformers' ``generate`` gives them to the teacher."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def to_width(x: torch.Tensor, width: int, fill: float = 0.0) -> torch.Tensor:
    """``(..., V)`` → ``(..., width)``: cut to the first ``width`` columns, or pad on the right with ``fill``.

    How a proxy's per-token output meets a teacher whose output width differs: the columns past one
    tokenizer are embedding padding that no text uses (:func:`~antidistill.tokenizer_compat.check_vocab_sizes`).
    """
    if width == x.shape[-1]:
        return x
    if width < x.shape[-1]:
        return x[..., :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=fill)


@torch.no_grad()
def perturbed(model: torch.nn.Module, grad: Mapping[str, torch.Tensor], scale: float) -> torch.nn.Module:
    """In place: θ ← θ + scale·g, computed in float32 and rounded once to each parameter's dtype."""
    for name, p in trainable_parameters(model).items():
        p.copy_((p.float() + scale * grad[name].to(p.device, torch.float32)).to(p.dtype))
    return model


class ProxyDelta:
    """Δ̂(x) for every token x at the last position of each row (eq. 10, its central form, or eq. 12-13).

    Call it with the ``(B, L)`` ids of a growing batch. When a call's ids extend those of the
    previous call (same rows, same prefix, longer), only the new tokens are run through the
    proxy with its KV caches; otherwise the caches are reset and the prompt is prefilled.

    Padding is the caller's, never a guess: on a prefill, ``attention_mask`` (the ``(B, L)`` mask
    ``generate`` was given) says which positions are real; without one, leading runs of the
    caller's ``pad_token_id`` are left padding, and with neither every position is real. Padded
    positions are masked, with position ids counted from the first real token, as transformers'
    ``generate`` does for the teacher. The proxy's own ``config.pad_token_id`` is never used.

    Args:
        vocab_size: the teacher's vocabulary width, when it differs from the proxy's: Δ̂ is cut to
            it, or padded with 0 (rows past both tokenizers are embedding padding that no text uses;
            :func:`~antidistill.tokenizer_compat.check_vocab_sizes` checks that). Default: the proxy's.
    """

    def __init__(
        self,
        proxy,
        grad,
        *,
        eps: float,
        difference: str = "central",
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
    ):
        check_eps(eps)
        check_difference(difference)
        owned = not isinstance(proxy, torch.nn.Module)
        proxy = load_causal_lm(proxy)
        attn = getattr(proxy.config, "_attn_implementation", "eager")
        if not owned and difference != "central" and (proxy.training or (difference == "jvp" and attn != "eager")):
            proxy, owned = copy.deepcopy(proxy), True  # the caller's model keeps its mode and attention
        grad = load_gradient(grad, proxy)
        self.eps = float(eps)
        self.difference = difference
        self.config = proxy.config
        self.proxy_vocab_size = proxy.get_output_embeddings().weight.shape[0]
        self.vocab_size = self.proxy_vocab_size if vocab_size is None else int(vocab_size)
        self.pad_token_id = pad_token_id
        self._cache_kw = cache_kwarg(proxy)
        if difference == "jvp":
            # Forward-mode AD has no rule for fused SDPA/flash attention: use eager attention.
            if getattr(proxy.config, "_attn_implementation", "eager") != "eager":
                proxy.set_attn_implementation("eager")
            self.models = [proxy.eval()]
            self.params = trainable_parameters(proxy)
            self.tangents = {n: grad[n].to(p.device, p.dtype) for n, p in self.params.items()}
        elif difference == "central":
            minus = perturbed(copy.deepcopy(proxy), grad, -self.eps)
            plus = perturbed(proxy if owned else copy.deepcopy(proxy), grad, +self.eps)
            self.models = [plus.eval(), minus.eval()]
        else:  # forward: θ+εg is a copy, θ is the proxy itself
            plus = perturbed(copy.deepcopy(proxy), grad, +self.eps)
            self.models = [plus.eval(), proxy.eval()]
        del grad
        self.reset()

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def reset(self) -> None:
        """Forget the cached prefix; the next call prefills from scratch."""
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._caches: list | None = None

    def _plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """New tokens to feed and the full attention mask; resets the caches if the prefix changed."""
        prev = self._ids
        if (
            prev is not None
            and prev.shape[0] == input_ids.shape[0]
            and prev.shape[1] < input_ids.shape[1]
            and torch.equal(input_ids[:, : prev.shape[1]], prev)
        ):
            n_new = input_ids.shape[1] - prev.shape[1]
            mask = torch.cat([self._mask, self._mask.new_ones(input_ids.shape[0], n_new)], dim=1)
            return input_ids[:, prev.shape[1] :], mask
        self.reset()
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                 f"{tuple(input_ids.shape)}: they must match")
            return input_ids, attention_mask.to(input_ids.device).long()
        return input_ids, left_padding_mask(input_ids, self.pad_token_id)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` long ids (and, on a prefill, their ``(B, L)`` mask) → ``(B, V)`` float32 Δ̂ for
        the token after position L (V: ``vocab_size``)."""
        input_ids = input_ids.to(self.device)
        new, mask = self._plan(input_ids, attention_mask)
        pos = position_ids(mask)[:, -new.shape[1] :]
        kwargs = dict(attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        if self.difference == "jvp":
            delta = self._jvp(new, kwargs)
        else:
            caches = self._caches or [DynamicCache(config=m.config) for m in self.models]
            logits = [
                model(input_ids=new, **{self._cache_kw: cache}, **kwargs).logits[:, -1].float()
                for model, cache in zip(self.models, caches)
            ]
            self._caches = caches
            delta = finite_difference_delta(logits[0], logits[1], self.eps, self.difference)
        self._ids, self._mask = input_ids, mask
        return self._to_width(delta)

    def _to_width(self, delta: torch.Tensor) -> torch.Tensor:
        return to_width(delta, self.vocab_size)

    def _jvp(self, new: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Exact Δ = J_θ[log p(·; θ_P)]·g by forward-mode AD (eq. 12-13), with a dual KV cache."""
        model = self.models[0]
        with fwAD.dual_level():
            params = {n: fwAD.make_dual(p.detach(), self.tangents[n]) for n, p in self.params.items()}
            if self._caches:
                cache = DynamicCache(
                    ddp_cache_data=[
                        (fwAD.make_dual(kp, kt), fwAD.make_dual(vp, vt)) for (kp, kt), (vp, vt) in self._caches
                    ],
                    config=model.config,
                )
            else:
                cache = DynamicCache(config=model.config)
            out = functional_call(model, params, args=(), kwargs=dict(input_ids=new, **{self._cache_kw: cache}, **kwargs))
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            tangent = fwAD.unpack_dual(logp).tangent
            self._caches = [
                (_split_dual(layer.keys), _split_dual(layer.values)) for layer in cache.layers
            ]
        if tangent is None:  # g does not reach the output (cannot happen for a causal LM)
            tangent = torch.zeros_like(logp)
        return tangent.float()


def is_proxy_sequence(proxy) -> bool:
    """True when ``proxy`` names several proxies (a list or tuple), False for one model or path."""
    return isinstance(proxy, (list, tuple))


class EnsembleDelta:
    """Δ̂ = Σ_k w_k Δ̂_k over K proxies, each with its own g (:func:`~antidistill.functional.ensemble_delta`).

    Every proxy is one :class:`ProxyDelta` with its own KV caches; they share ε, the difference mode,
    the padding rule and the output width. Called like a :class:`ProxyDelta`: ``(B, L)`` ids (and, on a
    prefill, their mask) → ``(B, V)`` float32 Δ̂. Memory and compute are the sum of the members'
    (see this module's table): a central-difference ensemble runs 2 forward passes per proxy per token.

    Args:
        proxies: K ≥ 1 causal LMs or paths. Each gives Δ̂ over the same vocabulary width: the teacher's
            (``vocab_size``) or, without it, the proxies' own, which must then agree.
        grads: K gradients, ``grads[k]`` taken on ``proxies[k]`` (dicts, :class:`~antidistill.ProxyGradient`
            or ``.safetensors`` paths).
        proxy_weights: None (1/K each) or K finite weights ≥ 0, not all 0; normalised to sum 1.
        eps, difference, pad_token_id, vocab_size: as :class:`ProxyDelta`, shared by every proxy.

    Example:
        >>> ens = EnsembleDelta([proxy_a, proxy_b], [g_a, g_b], eps=1e-2, proxy_weights=[2, 1])  # doctest: +SKIP
        >>> ens(torch.tensor([[2, 5, 9]])).shape  # doctest: +SKIP
        torch.Size([1, 48])
    """

    def __init__(self, proxies, grads, *, eps: float, difference: str = "central", proxy_weights=None,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        if not is_proxy_sequence(proxies) or not proxies:
            raise ValueError(f"proxies must be a non-empty list of proxies, got {type(proxies).__name__}")
        if not is_proxy_sequence(grads) or len(grads) != len(proxies):
            n = len(grads) if is_proxy_sequence(grads) else "one"
            raise ValueError(f"grads must hold one gradient per proxy: {len(proxies)} proxies, {n} gradient(s)")
        self.weights = check_proxy_weights(proxy_weights, len(proxies))
        check_eps(eps)
        check_difference(difference)
        self.members = [ProxyDelta(p, g, eps=eps, difference=difference, pad_token_id=pad_token_id,
                                   vocab_size=vocab_size) for p, g in zip(proxies, grads)]
        widths = {m.vocab_size for m in self.members}
        if len(widths) != 1:
            raise ValueError(f"the proxies' vocabularies differ in width {sorted(widths)}: an ensemble's proxies "
                             "must share the teacher's tokenizer (give vocab_size, the teacher's width)")
        self.eps = float(eps)
        self.difference = difference
        self.pad_token_id = pad_token_id
        self.vocab_size = widths.pop()

    @property
    def config(self):
        """The first proxy's config (its special-token ids stand for the ensemble's)."""
        return self.members[0].config

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def reset(self) -> None:
        """Forget every member's cached prefix."""
        for m in self.members:
            m.reset()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` ids (and, on a prefill, their mask) → ``(B, V)`` float32 Σ_k w_k Δ̂_k. A proxy of
        weight 0 is not run."""
        used = [(m, w) for m, w in zip(self.members, self.weights) if w > 0]
        deltas = [m(input_ids, attention_mask).to(self.device) for m, _ in used]
        return ensemble_delta(deltas, [w for _, w in used])


def _split_dual(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    primal, tangent = fwAD.unpack_dual(t)
    return primal, (tangent if tangent is not None else torch.zeros_like(primal))
