"""Holdout-only calibration: each arm's τ or λ grid chosen to hit target teacher accuracies.

For every arm and every candidate parameter in ``CalibrationConfig.grids`` the teacher samples the
holdout problems (never train or test) and is scored on the *delivered* traces, exactly as the
sweep scores it. Each arm's parameters for the target teacher accuracies are then read off its
measured curve by linear interpolation (accuracy falls as τ or λ grows; a target outside the
measured range gets the nearest measured end, flagged). No student is trained or looked at.

``antidistill calibrate`` runs it and writes ``runs/<name>-calibration/calibration.json``. A sweep
with ``grid: calibrated`` runs it as its own first stage and takes its points from the ``chosen``
section (:func:`chosen_grid`); a config with ``grid: config`` lists values copied from such a file.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import field
from pathlib import Path

import numpy as np
from pydantic.dataclasses import dataclass

from ..functional import check_lam, check_tau
from ..io_utils import provenance, write_json_atomic
from ..settings import CONFIG
from .arms import ARMS
from .evaluate import accuracy_summary
from ..generation import generate_traces
from .rundir import stage


@dataclass(config=CONFIG)
class CalibrationConfig:
    """Candidate grids per arm (τ for temperature, λ otherwise), target teacher accuracies, holdout size."""

    grids: dict[str, list[float]] = field(default_factory=lambda: {
        "temperature": [0.7, 1.0, 1.3, 1.6, 1.9],
        "antidistill": [0.002, 0.004, 0.006, 0.008, 0.010, 0.013],
        "reasoning_only": [0.004, 0.008, 0.013, 0.018, 0.025],
        "whitebox": [0.002, 0.004, 0.006, 0.008, 0.010, 0.013],
    })
    targets: list[float] = field(default_factory=lambda: [0.8, 0.7, 0.6])
    arm_targets: dict[str, list[float]] = field(default_factory=dict)  # an arm's own targets, in place of ``targets``
    n_holdout: int | None = 150  # the first N holdout problems (None: all)
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.grids) - (set(ARMS) - {"greedy"}))
        if unknown:
            raise ValueError(f"calibration.grids: unknown arms {unknown}; use {sorted(set(ARMS) - {'greedy'})}")
        stray = sorted(set(self.arm_targets) - set(self.grids))
        if stray:
            raise ValueError(f"calibration.arm_targets: {stray} have no grid in calibration.grids")
        for arm, grid in self.grids.items():
            if not grid:
                raise ValueError(f"calibration.grids.{arm} is empty")
            for x in grid:  # checked now, not when the calibration stage reaches them
                if arm == "temperature":
                    check_tau(x)
                else:
                    check_lam(x)
        for arm, ts in {"targets": self.targets, **self.arm_targets}.items():
            if not ts or not all(0.0 < t < 1.0 for t in ts):
                raise ValueError(f"calibration targets of {arm!r} must be accuracies in (0, 1), got {ts!r}")
        if self.n_holdout is not None and self.n_holdout < 1:
            raise ValueError(f"calibration.n_holdout must be ≥ 1 or null (all), got {self.n_holdout!r}")

    def targets_for(self, arm: str) -> list[float]:
        return self.arm_targets.get(arm, self.targets)


def interpolate_params(params: list[float], accs: list[float], targets: list[float]) -> list[dict]:
    """The parameter at which the measured (param, accuracy) curve reaches each target (linear)."""
    p, a = np.asarray(params, float), np.asarray(accs, float)
    order = np.argsort(p)
    p, a = p[order], np.minimum.accumulate(a[order])  # accuracy made non-increasing in the parameter
    out = []
    for t in targets:
        inside = a.min() <= t <= a.max()
        # np.interp needs increasing x: interpolate the parameter over the reversed accuracy curve
        value = float(np.interp(t, a[::-1], p[::-1]))
        # six significant digits: what a point's directory name (``f"{param:g}"``) shows
        out.append({"target": t, "param": float(f"{value:.6g}"), "inside_measured_range": bool(inside)})
    return out


def calibrate(run, cfg: CalibrationConfig, progress: bool = True) -> Path:
    """Measure each arm's holdout teacher accuracy over its grid; write ``calibration.json`` in ``run``'s directory.

    ``run`` is a :class:`~antidistill.experiment.sweep.Run` (its models, splits and proxy gradients).
    """
    def make(path):
        holdout = run.splits["holdout"][: cfg.n_holdout] if cfg.n_holdout else run.splits["holdout"]
        measured: dict[str, list[dict]] = {}
        for arm, grid in cfg.grids.items():
            for param in grid:
                t0 = time.perf_counter()
                settings = run.cfg.settings_for(arm, param, cfg.seed)
                rows = generate_traces(run.teacher, run.tok["teacher"], holdout, settings,
                                       processor=run.processor_for(arm, settings), progress=progress,
                                       description=f"calibrate {arm} {param:g}")
                acc = accuracy_summary(rows)
                measured.setdefault(arm, []).append(
                    {"param": param, "teacher_acc": acc["accuracy"], "ci_low": acc["ci_low"], "ci_high": acc["ci_high"],
                     "forced_frac": sum(r["answer_source"] == "forced" for r in rows) / len(rows),
                     "seconds": round(time.perf_counter() - t0, 1)})
        chosen = {arm: interpolate_params([m["param"] for m in ms], [m["teacher_acc"] for m in ms],
                                          cfg.targets_for(arm))
                  for arm, ms in measured.items()}
        write_json_atomic(path, {"config": dataclasses.asdict(cfg), "n_holdout": len(holdout), "split": "holdout",
                                 "scoring": "delivered", "measured": measured, "chosen": chosen, **provenance()})
    return stage(run.files.calibration, make)


def outside_picks(path: Path) -> list[str]:
    """``"arm target → param"`` for every chosen value whose target lies outside the measured curve
    (the value is then the grid's end, not the target's)."""
    info = json.loads(Path(path).read_text())
    return [f"{arm} {c['target']:g} → {c['param']:g}" for arm, picks in info["chosen"].items() for c in picks
            if not c["inside_measured_range"]]


def chosen_grid(path: Path) -> dict[str, list[float]]:
    """Each calibrated arm's chosen τ or λ values from ``calibration.json`` (sorted, duplicates merged:
    two targets past the same end of the measured range choose the same value)."""
    info = json.loads(Path(path).read_text())
    return {arm: sorted({p["param"] for p in picks}) for arm, picks in info["chosen"].items()}
