"""Adaptive distillers: what a distiller who adapts does with the teacher's traces, as small functions.

Every result of the paper assumes a *naive* distiller: one LoRA fine-tune on every trace received.
A distiller who adapts has labels, some clean data, compute and a choice of starting point. Each
variant below is a config (``kind`` names it in a sweep's ``distillers:`` list) and one pure function
(or a thin wrapper around ``distill``), composed with :func:`~antidistill.experiment.distill.distill`
by the sweep's stages (``experiment.distiller_stages``):

============== =============================================================================================
``naive``       today's distillation: LoRA SFT on every delivered trace (``DistillConfig`` as configured)
``correct_only`` keep only the traces whose delivered answer equals the label (:func:`correct_only`)
``clean_mix``   add the ground-truth solutions of a seeded ``fraction`` of the problems (:func:`clean_mix`)
``harder``      full fine-tuning instead of LoRA, ``epochs_factor`` × the epochs (:func:`harder_config`)
``grad_align``  weight each trace by the clipped, mean-normalised cosine between its loss gradient and
                the student's gradient on a clean set (:func:`trace_cosines`, :func:`alignment_weights`)
``answers_only`` the student samples ``k`` solutions per problem and keeps those that reach the teacher's
                delivered answer: rejection sampling against the teacher's answers (:func:`answers_only`),
                from the base student or from one warm-started on ``warm_start`` clean solutions
``warm_start``  fine-tune the student on a clean set first (:func:`clean_set`), then distil from it
============== =============================================================================================

The clean data a distiller has are ground-truth solutions (``solution``) of ``n_clean`` training
problems, drawn with the sweep seed (:func:`clean_set`): the same set for every arm at one seed.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, Union

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass

from ..gradient import compute_proxy_gradient
from ..settings import CONFIG, SamplingSettings
from .distill import DistillConfig
from ..generation import generate_traces
from ..scoring import is_correct


@dataclass(config=CONFIG)
class Naive:
    """Today's distillation: the sweep's ``distill`` settings on every delivered trace."""

    kind: Literal["naive"] = "naive"


@dataclass(config=CONFIG)
class CorrectOnly:
    """Keep only the traces whose delivered answer is correct (the distiller has the labels)."""

    kind: Literal["correct_only"] = "correct_only"


@dataclass(config=CONFIG)
class CleanMix:
    """Add ground-truth solutions for ``fraction`` of the traces' problems (seeded by the sweep seed)."""

    kind: Literal["clean_mix"] = "clean_mix"
    fraction: float = Field(0.1, gt=0.0, le=1.0, allow_inf_nan=False)


@dataclass(config=CONFIG)
class Harder:
    """Full fine-tuning (no LoRA) for ``epochs_factor`` × the sweep's epochs, at learning rate ``lr`` (None: the
    sweep's ``distill.lr``, which was chosen for LoRA)."""

    kind: Literal["harder"] = "harder"
    epochs_factor: float = Field(3.0, gt=0.0, allow_inf_nan=False)
    lr: float | None = Field(None, gt=0.0, allow_inf_nan=False)


@dataclass(config=CONFIG)
class GradAlign:
    """Weighted SFT: each trace weighted by its gradient's alignment with the clean-set gradient."""

    kind: Literal["grad_align"] = "grad_align"
    n_clean: int = Field(64, ge=1)


@dataclass(config=CONFIG)
class AnswersOnly:
    """Rejection sampling against the teacher's answers: ``k`` student samples per problem at τ = ``tau``,
    prompted with ``few_shot`` clean examples, kept when their answer equals the teacher's delivered one.

    ``warm_start`` > 0: the student is first fine-tuned on that many clean solutions (as ``warm_start``
    does), and that student both samples and is distilled, as a distiller whose student already reasons
    would do; 0: the base student samples and is distilled."""

    kind: Literal["answers_only"] = "answers_only"
    k: int = Field(4, ge=1)
    tau: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    few_shot: int = Field(3, ge=0)
    warm_start: int = Field(0, ge=0)


@dataclass(config=CONFIG)
class WarmStart:
    """Fine-tune the student on ``n_clean`` ground-truth solutions first (``epochs``: the sweep's if None)."""

    kind: Literal["warm_start"] = "warm_start"
    n_clean: int = Field(64, ge=1)
    epochs: float | None = Field(None, gt=0.0, allow_inf_nan=False)


DistillerConfig = Annotated[Union[Naive, CorrectOnly, CleanMix, Harder, GradAlign, AnswersOnly, WarmStart],
                            Field(discriminator="kind")]
DISTILLERS: tuple[str, ...] = ("naive", "correct_only", "clean_mix", "harder", "grad_align", "answers_only",
                               "warm_start")
NAIVE = "naive"


@dataclass(config=CONFIG)
class DistillerScope:
    """The points the adaptive distillers run at (the naive distiller runs at every point).

    ``targets``: a calibrated design's targets (points below the world's greedy holdout accuracy), e.g.
    ``[-5.0]``; ``arms``: arm names as the design runs them (``antidistill`` does not cover
    ``antidistill@<proxy>``; list each), e.g. ``[temperature, antidistill, whitebox]``. None: every target
    or arm. A point is in scope by the target its rows carry (``calibration.Design.targets``); greedy is
    never in scope (it has no target and no counterpart).

    >>> DistillerScope(targets=[-5.0], arms=["temperature"]).covers("temperature", -5.0)
    True
    >>> DistillerScope(targets=[-5.0]).covers("antidistill", -2.0)
    False
    """

    targets: list[float] | None = None
    arms: list[str] | None = None

    def __post_init__(self):
        for name in ("targets", "arms"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ValueError(f"distill_at.{name} must list at least one entry, or be left out (every {name[:-1]})")

    @property
    def everywhere(self) -> bool:
        return self.targets is None and self.arms is None

    def covers(self, method: str, target: float | None) -> bool:
        """Whether a point of arm ``method`` whose rows carry calibrated ``target`` (None: none) is in scope."""
        if self.everywhere:
            return True
        if method == "greedy" or self.arms is not None and method not in self.arms:
            return False
        return self.targets is None or target in self.targets


# settings added after run directories were first written: a record leaves them out at these defaults
LATER_DEFAULTS: dict[str, dict] = {"answers_only": {"warm_start": 0}}


def distiller_record(d) -> dict:
    """Distiller ``d``'s settings as a run records them (``config.yaml``, ``distillers/<kind>/settings.json``):
    a setting added later (:data:`LATER_DEFAULTS`) is left out at its default, so a record written before it
    existed still matches.

    >>> distiller_record(AnswersOnly()) == {"kind": "answers_only", "k": 4, "tau": 1.0, "few_shot": 3}
    True
    """
    record = dataclasses.asdict(d)
    for key, default in LATER_DEFAULTS.get(d.kind, {}).items():
        if record.get(key) == default:
            del record[key]
    return record


def distiller_entries(value):
    """A ``distillers:`` list as written in YAML or ``--set``: a bare name stands for that variant's defaults.

    >>> distiller_entries(["naive", {"kind": "clean_mix", "fraction": 0.2}])
    [{'kind': 'naive'}, {'kind': 'clean_mix', 'fraction': 0.2}]
    """
    if isinstance(value, (list, tuple)):
        return [{"kind": v} if isinstance(v, str) else v for v in value]
    return value


def check_distillers(distillers: Sequence) -> None:
    """At least one distiller, each kind at most once (a kind names its student directories and rows)."""
    kinds = [d.kind for d in distillers]
    if not kinds:
        raise ValueError("distillers must list at least one distiller (e.g. [naive])")
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise ValueError(f"distillers lists {dup} more than once; each kind may appear once")


# --- the variants, as functions of their inputs ----------------------------------------------------

def correct_only(traces: Sequence[Mapping]) -> list[dict]:
    """The traces whose delivered answer is correct (``correct``, scored by ``generation``'s delivered rule)."""
    return [dict(t) for t in traces if t["correct"]]


def clean_rows(problems: Sequence[Mapping]) -> list[dict]:
    """Training rows from ground-truth solutions: ``completion`` is the problem's ``solution``."""
    return [{"id": p["id"], "question": p["question"], "completion": p["solution"], "answer": str(p["answer"]),
             "source": "clean"} for p in problems]


def clean_set(problems: Sequence[Mapping], n: int, seed: int) -> list[dict]:
    """``n`` problems drawn without replacement with ``random.Random(seed)``, as clean training rows."""
    if not 1 <= n <= len(problems):
        raise ValueError(f"n_clean must be between 1 and the {len(problems)} training problems, got n_clean={n}")
    return clean_rows(random.Random(seed).sample(list(problems), n))


def clean_mix(traces: Sequence[Mapping], problems: Mapping[str, Mapping], fraction: float, seed: int) -> list[dict]:
    """The traces plus the ground-truth solutions of ``round(fraction · N)`` of their N problems.

    Args:
        traces: teacher rows (``id``, ``question``, ``completion``, ...).
        problems: the training problems by ``id`` (each with ``solution``).
        fraction: in (0, 1].
        seed: which problems (``random.Random(seed).sample`` over the traces' ids, in trace order).

    Returns:
        ``traces`` (unchanged, first) then one clean row per chosen problem (``source="clean"``).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got fraction={fraction!r}")
    ids = [t["id"] for t in traces]
    missing = [i for i in ids if i not in problems]
    if missing:
        raise ValueError(f"clean_mix has no ground-truth solution for trace ids {missing[:5]}")
    chosen = random.Random(seed).sample(ids, round(fraction * len(ids)))
    return [dict(t) for t in traces] + clean_rows([problems[i] for i in chosen])


def harder_config(cfg: DistillConfig, epochs_factor: float = 3.0, lr: float | None = None) -> DistillConfig:
    """``cfg`` with LoRA off (every parameter trains), ``epochs_factor`` × its epochs, and ``lr`` if given."""
    return dataclasses.replace(cfg, lora=False, epochs=cfg.epochs * epochs_factor, lr=cfg.lr if lr is None else lr)


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """cos(a, b) of two gradients keyed by parameter name (float64; 0 if either is zero)."""
    if a.keys() != b.keys():
        raise ValueError(f"the gradients differ in parameters: {sorted(set(a) ^ set(b))[:5]}")
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a))
    nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def alignment_weights(cosines: Sequence[float]) -> list[float]:
    """Per-trace weights: w_i = max(cos_i, 0), divided by their mean (so they average 1, as the Distillation
    Game's weights do); all zero if no trace is aligned.

    >>> alignment_weights([0.5, -0.2, 0.25, 0.0])
    [2.6666666666666665, 0.0, 1.3333333333333333, 0.0]
    """
    w = [max(float(c), 0.0) for c in cosines]
    mean = sum(w) / len(w) if w else 0.0
    return [x / mean for x in w] if mean > 0 else [0.0] * len(w)


def trace_cosines(model, tokenizer, traces: Sequence[Mapping], reference: Mapping[str, torch.Tensor], *,
                  system_prompt: str | None = None, max_length: int | None = None) -> list[float]:
    """cos(∇θ ℓ_i, reference) for each trace: ℓ_i is the model's mean completion-token NLL on trace i (the
    loss SFT descends), over every parameter that requires grad; one backward pass per trace."""
    out = []
    for t in traces:
        g = compute_proxy_gradient(model, tokenizer, [t], batch_size=1, max_length=max_length,
                                   system_prompt=system_prompt).grad
        out.append(cosine(g, reference))
    return out


def answers_only(teacher_rows: Sequence[Mapping], samples: Sequence[Mapping]) -> list[dict]:
    """The student samples whose answer equals the teacher's delivered answer for the same problem.

    Args:
        teacher_rows: the teacher's delivered rows (``id``, ``forced_answer``): the distiller sees only the answers.
        samples: the student's own rows (``id``, ``question``, ``completion``, ``forced_answer``), any number per id.

    Returns:
        The kept samples as training rows, ``answer`` set to the teacher's answer, ``source="student"``.
        Equality is math-verify's (``scoring.is_correct``); an empty teacher answer matches nothing.
    """
    target = {t["id"]: str(t["forced_answer"]) for t in teacher_rows}
    return [{"id": s["id"], "question": s["question"], "completion": s["completion"], "answer": target[s["id"]],
             "forced_answer": s["forced_answer"], "source": "student"}
            for s in samples if s["id"] in target and is_correct(str(s["forced_answer"]), target[s["id"]])]


def sample_student(model, tokenizer, problems: Sequence[Mapping], k: int, settings: SamplingSettings, *,
                   few_shot: list[dict] | None = None, progress: bool = False) -> list[dict]:
    """``k`` sampled solutions per problem from ``model`` (delivered scoring: a trace without an answer gets a
    sampled one), each row tagged with its problem's ``id`` and ``sample`` index.

    The problems are repeated ``k`` times in a row and generated with ``settings`` (seeded per batch), so the
    samples are reproducible for a given seed and batch size.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got k={k}")
    repeated = [{"id": p["id"], "question": p["question"], "answer": str(p["answer"])} for p in problems
                for _ in range(k)]
    rows = generate_traces(model, tokenizer, repeated, settings, few_shot=few_shot, progress=progress,
                           description="student samples (answers only)")
    return [r | {"sample": i % k} for i, r in enumerate(rows)]
