"""One settings object for sampling, shared by the processor, gradient, generation and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .functional import check_difference, check_eps, check_lam, check_tau

METHODS = ("greedy", "temperature", "antidistill", "permutation")


@dataclass
class SamplingSettings:
    """How the teacher samples its traces.

    ``tau`` is the one temperature: plain sampling uses softmax(log p_T/τ) (eq. 1), antidistillation
    softmax(log p_T/τ + λΔ̂) (eq. 11). :meth:`generate_kwargs` hands the same τ to ``generate``.
    """

    method: str = "antidistill"
    tau: float = 0.9
    lam: float = 0.0
    eps: float = 1e-2
    difference: str = "central"
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    answer_tokens: int = 8
    batch_size: int = 16
    seed: int = 0
    system_prompt: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got method={self.method!r}")
        check_tau(self.tau)
        check_lam(self.lam)
        check_eps(self.eps)
        check_difference(self.difference)
        if not (0.0 < self.top_p <= 1.0) or not math.isfinite(self.top_p):
            raise ValueError(f"top_p must be in (0, 1], got top_p={self.top_p!r}")
        for name in ("top_k", "max_new_tokens", "answer_tokens", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "top_k" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'top_k' else 1}, got {name}={v!r}")

    @property
    def uses_proxy(self) -> bool:
        return self.method in ("antidistill", "permutation")

    def generate_kwargs(self) -> dict:
        """The sampling arguments for ``model.generate`` that match these settings."""
        if self.method == "greedy":
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.tau, "top_p": self.top_p, "top_k": self.top_k}
