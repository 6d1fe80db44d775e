"""How the teacher samples: the parameters of eq. 11, and everything else a trace generation needs.

Declared once here and nested wherever they are used: the sweep's config nests a
:class:`SamplingSettings`, the server's config an :class:`Eq11Settings`, and the CLI options are
derived from the fields (``antidistill.cli.options``). Validation runs on construction, so a bad
value is a ``ValueError`` naming the field and the value wherever it comes from.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from .functional import check_eps, check_lam, check_tau

Method = Literal["greedy", "temperature", "antidistill", "permutation"]
Difference = Literal["central", "forward", "jvp"]
METHODS: tuple[str, ...] = get_args(Method)

# Every config of the project refuses unknown keys; values are validated on construction.
CONFIG = ConfigDict(extra="forbid")


@dataclass(config=CONFIG)
class Eq11Settings:
    """The parameters of eq. 11, softmax(log p_T/τ + λ·Δ̂): τ scales the teacher term only."""

    lam: float = Field(0.0, description="λ, the weight of Δ̂ in eq. 11 (0: plain temperature sampling)")
    eps: float = Field(1e-2, description="ε of the finite difference of Δ̂")
    tau: float = Field(0.9, description="τ, the teacher temperature of eq. 1 / eq. 11")
    difference: Difference = Field("central", description="how Δ̂ is computed: central | forward | jvp")

    @field_validator("lam")
    @classmethod
    def _lam(cls, v: float) -> float:
        check_lam(v)
        return v

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: float) -> float:
        check_eps(v)
        return v

    @field_validator("tau")
    @classmethod
    def _tau(cls, v: float) -> float:
        check_tau(v)
        return v


@dataclass(config=CONFIG)
class SamplingSettings(Eq11Settings):
    """How the teacher samples its traces: the method, eq. 11's parameters, and the decoding budget.

    ``tau`` is the one temperature: plain sampling uses softmax(log p_T/τ) (eq. 1), antidistillation
    softmax(log p_T/τ + λΔ̂) (eq. 11).
    """

    method: Method = Field("antidistill", description="greedy | temperature | antidistill | permutation")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass, applied after eq. 11")
    top_k: int = Field(0, ge=0, description="top-k after eq. 11 (0: off)")
    max_new_tokens: int = Field(256, ge=1, description="trace length cap in tokens")
    answer_tokens: int = Field(8, ge=1, description="tokens generated after the forced answer header")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    seed: int = Field(0, description="sampling seed (batch i uses seed + i)")
    system_prompt: str | None = Field(None, description="system message (default: the project's)")

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"top_p must be in (0, 1], got top_p={v!r}")
        return v

    @property
    def uses_proxy(self) -> bool:
        return self.method in ("antidistill", "permutation")

    def sampling_kwargs(self) -> dict:
        """``do_sample``, ``temperature`` (τ), ``top_p`` and ``top_k`` for these settings: for
        ``model.generate`` without a processor, or :func:`antidistill.generate` with one (which checks
        that the temperature is the processor's τ and hands ``model.generate`` 1; see
        ``AntidistillationLogitsProcessor.generate_kwargs``)."""
        if self.method == "greedy":
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.tau, "top_p": self.top_p, "top_k": self.top_k}
