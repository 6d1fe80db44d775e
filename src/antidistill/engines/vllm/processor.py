"""vLLM V1 logits processors: the serving guard and the per-request offline modes.

Both sit on top of :class:`~antidistill.engines.vllm.composite.AntidistillForCausalLM`, which has
already computed Δ̂ on vLLM's paged KV cache.

:class:`ServeLogitsProcessor` (``output="eq11"``: the model already returns τ·eq. 11)
    ``validate_params`` runs at admission, in the front end, for every request. It rejects
    operator-only ``vllm_xargs``, ``logit_bias``, prompt logprobs and penalties (HTTP 400), and
    sets the request's temperature to ``max(T, τ)``. vLLM's sampler then samples
    softmax(τ·z/max(T, τ)) with z the eq. 11 logit: q itself for any T < τ (0 and omitted
    included, so temperature 0 is never argmax), q^(τ/T) for T ≥ τ. Because temperature divides
    the whole eq. 11 logit, two requests at different temperatures cannot separate log p_T from
    Δ̂. ``apply`` only enforces: a row that is not finite is refused by the one non-finite rule
    (:func:`antidistill.functional.refuse_nonfinite`: it can only emit EOS, the teacher is never the
    fallback), and so is a row whose temperature is below τ (a request that bypassed ``validate_params``).

:class:`OfflineLogitsProcessor` (``output="teacher"``: the model returns the raw teacher and Δ̂)
    For the experiment. Each request picks ``extra_args["antidistill_mode"]``: ``"antidistill"``
    (eq. 11, the default), ``"permutation"`` (appendix A) or ``"teacher"`` (plain teacher, for
    greedy decoding, temperature sampling and answer forcing). As with the transformers processor,
    rows are returned as τ·eq. 11 and the request's temperature must be τ; a non-finite row is
    refused (EOS only, with a warning), as ``AntidistillationLogitsProcessor`` does.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ...functional import antidistillation_logits, permute_delta, refuse_nonfinite
from . import composite

from .policy import MODE_KEY, MODES, OPERATOR_ONLY, SERVE_MIN_TOP_P_ENV, SERVE_TAU_ENV

__all__ = ["MODE_KEY", "MODES", "OPERATOR_ONLY", "SERVE_TAU_ENV", "OfflineLogitsProcessor", "ServeLogitsProcessor"]


def _apply_batch_update(rows: dict, batch_update: BatchUpdate | None, new_state, stats: Counter) -> None:
    """Row → state bookkeeping in the documented order: removed, added, moved.

    A finished row is often not in ``removed`` at all (it is overwritten by an add or a move), so
    every added or moved row replaces whatever was at its index (counted as ``implicit_removals``).
    """
    if batch_update is None:
        return
    for i in batch_update.removed:
        rows.pop(i, None)
        stats["removed"] += 1
    for i, params, prompt_ids, output_ids in batch_update.added:
        stats["implicit_removals"] += i in rows
        stats["added"] += 1
        rows[i] = new_state(params, prompt_ids, output_ids)
    for a, b, direction in batch_update.moved:
        sa, sb = rows.pop(a, None), rows.pop(b, None)
        stats["moved"] += 1
        if sa is not None:
            rows[b] = sa
        if direction == MoveDirectionality.SWAP:
            if sb is not None:
                rows[a] = sb
        else:
            stats["implicit_removals"] += sb is not None


def _composite_eos_ids(vllm_config) -> list[int]:
    eos = vllm_config.model_config.hf_config.antidistill.get("eos_token_ids") or []
    return [int(e) for e in eos]


class ServeLogitsProcessor(LogitsProcessor):
    """The serving guard (see the module docstring)."""

    n_refused_rows = 0  # rows that could only emit EOS (non-finite, or temperature below τ)
    stats: Counter = Counter()  # batch-update bookkeeping, for tests and diagnostics

    @classmethod
    def serve_tau(cls) -> float:
        raw = os.environ.get(SERVE_TAU_ENV)
        if raw is None:
            raise ValueError(f"antidistillation server misconfigured: {SERVE_TAU_ENV} is not set")
        return float(raw)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        tau = cls.serve_tau()
        sp = sampling_params
        xargs = sp.extra_args or {}
        bad = sorted(k for k in xargs if str(k).lower() in OPERATOR_ONLY or k == MODE_KEY)
        if bad:
            raise ValueError(f"operator-only field(s) {bad} cannot be set by a request")
        if sp.logit_bias:
            raise ValueError("logit_bias is not supported: it would let a request reshape the teacher's distribution")
        if sp.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported")
        if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0 or sp.repetition_penalty != 1.0:
            raise ValueError("presence/frequency/repetition penalties are not supported")
        # No truncation towards the argmax of q (greedy eq. 11 is the near-clean trace the defense keeps
        # from clients): top_k and min_p are refused, and top_p is raised to the operator's floor.
        if sp.top_k not in (0, -1) or sp.min_p > 0.0:
            raise ValueError("top_k and min_p are not supported: they would truncate the distribution to its argmax")
        sp.top_p = max(float(sp.top_p), float(os.environ.get(SERVE_MIN_TOP_P_ENV, "1")))
        # Temperature acts on the whole eq. 11 logit and never goes below τ: T < τ (0 and omitted
        # included) samples q itself; T >= τ samples q^(τ/T). See the module docstring.
        sp.temperature = max(float(sp.temperature), tau)

    def __init__(self, vllm_config, device, is_pin_memory):
        ad = vllm_config.model_config.hf_config.antidistill
        if ad.get("output") != "eq11":
            raise ValueError("ServeLogitsProcessor needs the composite model in output='eq11' mode")
        self.tau = float(ad["tau"])
        self.eos = _composite_eos_ids(vllm_config)
        self.temps: dict[int, float] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # run on every row, greedy ones included (there are none after validate_params)

    def update_state(self, batch_update):
        _apply_batch_update(self.temps, batch_update, lambda p, _prompt, _out: float(p.temperature), self.stats)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        below = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for i, t in self.temps.items():
            if i < logits.shape[0] and t < self.tau * (1 - 1e-6):
                below[i] = True
        if bool(below.any()):  # treated as refused: make the row non-finite, then apply the one rule
            logits = torch.where(below[:, None], torch.full_like(logits, float("nan")), logits)
        out, refused = refuse_nonfinite(logits, self.eos)
        if bool(refused.any()):
            n = int(refused.sum())
            type(self).n_refused_rows += n
            warnings.warn(f"antidistillation: {n} row(s) not finite or below τ were refused; they can only stop",
                          RuntimeWarning)
        return out.to(logits.dtype)


class _Row:
    __slots__ = ("mode", "generator")

    def __init__(self, mode: str, generator):
        self.mode, self.generator = mode, generator


class OfflineLogitsProcessor(LogitsProcessor):
    """Per-request eq. 11 / permutation / plain teacher for the experiment (see the module docstring)."""

    n_refused_rows = 0
    stats: Counter = Counter()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        mode = (sampling_params.extra_args or {}).get(MODE_KEY, "antidistill")
        if mode not in MODES:
            raise ValueError(f"{MODE_KEY} must be one of {MODES}, got {mode!r}")

    def __init__(self, vllm_config, device, is_pin_memory):
        ad = vllm_config.model_config.hf_config.antidistill
        if ad.get("output") != "teacher":
            raise ValueError("OfflineLogitsProcessor needs the composite model in output='teacher' mode")
        self.lam, self.tau = float(ad["lam"]), float(ad["tau"])
        self.has_proxy = bool(ad.get("proxy"))
        self.eos = _composite_eos_ids(vllm_config)
        self.device = device
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def _new_row(self, params: SamplingParams, _prompt, _out) -> _Row:
        xargs = params.extra_args or {}
        mode = xargs.get(MODE_KEY, "antidistill")
        gen = None
        if mode == "permutation":
            seed = xargs.get("permutation_seed", params.seed if params.seed is not None else 0)
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        return _Row(mode, gen)

    def update_state(self, batch_update):
        _apply_batch_update(self.rows, batch_update, self._new_row, self.stats)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        delta = composite.DELTA.delta
        composite.DELTA.delta = None
        modes = [self.rows[i].mode if i in self.rows else "antidistill" for i in range(n)]
        if all(m == "teacher" for m in modes) or self.lam == 0.0 or not self.has_proxy:
            return logits  # eq. 1 (λ = 0) is the plain teacher at temperature τ, as in the HF processor
        if delta is None or delta.shape != logits.shape:
            raise RuntimeError(
                f"antidistillation: no Δ̂ for these {n} logit rows (got {None if delta is None else tuple(delta.shape)}); "
                "the offline processor only runs behind the composite model without speculative decoding"
            )
        delta = delta.clone()
        for i, m in enumerate(modes):
            if m == "permutation":
                delta[i : i + 1] = permute_delta(delta[i : i + 1], self.rows[i].generator)
        adjusted, refused = refuse_nonfinite(
            antidistillation_logits(logits, delta, self.lam, self.tau, times_tau=True), self.eos)
        if bool(refused.any()):
            type(self).n_refused_rows += int(refused.sum())
            warnings.warn("non-finite antidistillation scores; those rows were refused and can only stop",
                          RuntimeWarning)
        use = torch.tensor([m != "teacher" for m in modes], device=logits.device)
        return torch.where(use[:, None], adjusted.to(logits.dtype), logits)
