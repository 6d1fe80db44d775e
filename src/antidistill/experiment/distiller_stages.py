"""The sweep's stages for the adaptive distillers (``experiment.distillers``): each point's traces, once per distiller.

The naive distiller is the sweep's own point stages (``Run.point``), paths and rows unchanged. Every other
distiller ``kind`` adds, under ``points/<point>/distillers/<kind>/`` (``rundir.DistillerDir``):

1. ``train.jsonl``: the training set it made from the point's delivered traces (weights included);
2. ``student/``: the student distilled on it (with ``history.json``);
3. ``student_test.jsonl``, then ``result.json``: the point's row with ``distiller`` and ``n_train``.

What depends on the seed only (the warm-started student, the student's own samples, the clean-set gradient)
is made once per seed under ``distillers/<kind>/`` (:meth:`DistillerStages.prepare`, run by the parent
before any worker starts). Every artifact goes through ``rundir.stage``, so resuming redoes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..gradient import compute_proxy_gradient, load_gradient, save_gradient
from ..io_utils import atomic_dir, read_jsonl, write_json_atomic, write_jsonl, write_text_atomic
from ..proxy import load_causal_lm
from .distillers import (
    NAIVE,
    alignment_weights,
    answers_only,
    clean_mix,
    clean_set,
    correct_only,
    distiller_record,
    harder_config,
    sample_student,
    trace_cosines,
)
from .rundir import stage


def check_distiller_settings(files, distillers, *, write: bool) -> None:
    """Each adaptive distiller's settings as its run-level ``distillers/<kind>/settings.json`` records them.

    Its stages are keyed by its kind alone, so a distiller that comes back with other settings (dropped,
    then re-added) would reuse artifacts made with the old ones: refused. ``write``: record the settings of
    a distiller that has none yet."""
    for d in distillers:
        if d.kind == NAIVE:
            continue
        path = files.distiller(d.kind) / "settings.json"
        text = json.dumps(distiller_record(d), sort_keys=True)
        if path.is_file() and path.read_text() != text:
            raise ValueError(f"{path} records other settings for distiller {d.kind!r} ({path.read_text()}) than the "
                             f"config's ({text}): its artifacts were made with those; choose another run name")
        if write and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)


def with_distiller(row: dict, kind: str) -> dict:
    """``row`` with ``distiller`` = ``kind`` right after ``seed`` (a naive row's ``result.json`` has none)."""
    out = {}
    for k, v in row.items():
        if k != "distiller":
            out[k] = v
        if k == "seed":
            out["distiller"] = kind
    return out if "distiller" in out else out | {"distiller": kind}


class DistillerStages:
    """The adaptive distillers' stages of one :class:`~antidistill.experiment.sweep.Run`."""

    def __init__(self, run):
        self.run = run
        self.cfg = run.cfg
        self.adaptive = [d for d in self.cfg.distillers if d.kind != NAIVE]

    def distillers_at(self, method: str, param: float) -> list:
        """The configured distillers that run at this point: the naive one always, the others where
        ``distill_at`` covers the point's arm and the target its rows carry."""
        design = self.run.design
        target = design.targets.get((method, param)) if design else None
        return [d for d in self.cfg.distillers if d.kind == NAIVE or self.cfg.distill_at.covers(method, target)]

    # --- shared by every point of a seed ------------------------------------------------------------
    def clean(self, n: int, seed: int) -> list[dict]:
        """The distiller's clean data: ground-truth solutions of ``n`` training problems drawn with ``seed``."""
        return clean_set(self.run.splits["train"], n, seed)

    @staticmethod
    def n_warm(d) -> int:
        """How many clean solutions distiller ``d``'s student is fine-tuned on before anything else (0: none)."""
        if d.kind == "warm_start":
            return d.n_clean
        return d.warm_start if d.kind == "answers_only" else 0

    def warm_student(self, d, seed: int) -> Path:
        """The base student fine-tuned on ``n_warm(d)`` clean solutions, as a model folder (made once per seed)."""
        path = self.run.files.distiller(d.kind) / f"student_s{seed}"
        epochs = getattr(d, "epochs", None)
        cfg = self.cfg.distill if epochs is None else dataclasses.replace(self.cfg.distill, epochs=epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        return stage(path, lambda p: self.run._distill(self.clean(self.n_warm(d), seed), seed, p, cfg=cfg,
                                                       eval_traces=[]))

    def start_student(self, d, seed: int) -> str:
        """The model folder distiller ``d`` starts from: its warm student, or the base student."""
        return str(self.warm_student(d, seed)) if self.n_warm(d) else self.run.paths["student"]

    def student_samples(self, d, seed: int) -> list[dict]:
        """The starting student's own ``k`` samples per training problem (``answers_only``)."""
        path = self.run.files.distiller(d.kind) / f"samples_s{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)

        def make(p):
            settings = self.cfg.settings_for("temperature", d.tau, seed)
            shots = self.clean(d.few_shot, seed) if d.few_shot else None
            student = load_causal_lm(self.start_student(d, seed))
            write_jsonl(p, sample_student(student, self.run.tok["student"], self.run.splits["train"], d.k, settings,
                                          few_shot=shots, progress=self.run.progress))
        return read_jsonl(stage(path, make))

    def clean_gradient(self, d, seed: int) -> Path:
        """∇θ of the base student's mean completion-token NLL on the clean set (``grad_align``)."""
        path = self.run.files.distiller(d.kind) / f"clean_grad_s{seed}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)

        def make(p):
            student = load_causal_lm(self.run.paths["student"])
            result = compute_proxy_gradient(student, self.run.tok["student"], self.clean(d.n_clean, seed),
                                            max_length=self.cfg.distill.max_length)
            save_gradient(p, result, extra={"run": self.cfg.name, "what": "base student on the clean set"})
        return stage(path, make)

    def prepare(self, seeds) -> None:
        """Make every seed-level artifact now (in the parent of a parallel sweep, so no two workers race)."""
        for d in self.adaptive:
            for seed in sorted(set(seeds)):
                if self.n_warm(d):
                    self.warm_student(d, seed)
                if d.kind == "answers_only":
                    self.student_samples(d, seed)
                elif d.kind == "grad_align":
                    self.clean_gradient(d, seed)

    # --- per point ----------------------------------------------------------------------------------
    def train_rows(self, d, traces: list[dict], seed: int) -> list[dict]:
        """What distiller ``d`` trains on, made from one point's delivered ``traces``."""
        if d.kind in ("harder", "warm_start"):
            return traces
        if d.kind == "correct_only":
            return correct_only(traces)
        if d.kind == "clean_mix":
            return clean_mix(traces, {p["id"]: p for p in self.run.splits["train"]}, d.fraction, seed)
        if d.kind == "answers_only":
            return answers_only(traces, self.student_samples(d, seed))
        if d.kind == "grad_align":
            student = load_causal_lm(self.run.paths["student"])
            cos = trace_cosines(student, self.run.tok["student"], traces,
                                load_gradient(self.clean_gradient(d, seed), student),
                                max_length=self.cfg.distill.max_length)
            return [t | {"alignment": c, "weight": w} for t, c, w in zip(traces, cos, alignment_weights(cos))]
        raise ValueError(f"unknown distiller kind {d.kind!r}")

    def distill_student(self, d, rows: list[dict], seed: int, student_dir: Path) -> None:
        """Distil (or, with nothing to train on, keep) the student that ``d`` starts from into ``student_dir``."""
        start = self.start_student(d, seed)
        if not rows:  # every trace filtered out: the distiller keeps its starting student
            with atomic_dir(student_dir) as tmp:
                load_causal_lm(start).save_pretrained(tmp)
                (tmp / "history.json").write_text("[]")
            return
        cfg = harder_config(self.cfg.distill, d.epochs_factor, d.lr) if d.kind == "harder" else None
        weights = [r["weight"] for r in rows] if d.kind == "grad_align" else None
        self.run._distill(rows, seed, student_dir, start=start if self.n_warm(d) else None, cfg=cfg,
                          weights=weights)

    def row(self, method: str, param: float, seed: int, d) -> dict:
        """Run (or reuse) distiller ``d``'s stages at one point; returns its result row."""
        files = self.run.files.point(method, param, seed).distiller(d.kind)
        if files.result.is_file():
            return json.loads(files.result.read_text())
        settings = self.run.teacher_stages(method, param, seed)
        files.root.mkdir(parents=True, exist_ok=True)
        stage(files.train_set, lambda p: write_jsonl(p, self.train_rows(d, read_jsonl(files.traces), seed)))
        rows = read_jsonl(files.train_set)
        stage(files.student, lambda p: self.distill_student(d, rows, seed, p))
        student = load_causal_lm(str(files.student))
        greedy = self.cfg.settings_for("greedy", 0.0, seed)
        stage(files.student_test, self.run._traces(student, self.run.tok["student"], "test", greedy,
                                                   f"student on test [{method} {param:g} seed {seed}, {d.kind}]",
                                                   scoring="forced"))
        row = with_distiller(self.run._result_row(method, param, seed, settings, files, student), d.kind)
        row["n_train"] = len(rows)
        write_json_atomic(files.result, row)
        return row
