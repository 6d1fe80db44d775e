"""The world's gate: do its students learn from the teacher at all?

A poisoned trace can only show an effect if what the teacher writes changes what the student
learns. Two conditions, from a world's greedy and temperature runs alone (no defended arm):

* a student distilled on greedy traces reaches ``min_greedy_student`` test accuracy;
* under temperature sampling, student accuracy rises with teacher accuracy by at least
  ``min_slope`` student points per teacher point (OLS over the world's temperature runs).

A design run on worlds another design has gated reads that gate instead (``gate_from``: ``gate_on_record``,
``keep_recorded_gate``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..io_utils import write_json_atomic
from .results_io import recorded_gate
from .rundir import stage


def world_gate(df: pd.DataFrame, min_greedy_student: float = 0.45, min_slope: float = 0.2) -> dict:
    """The gate of one world from its runs (rows with ``method``, ``teacher_acc``, ``student_acc``).

    Returns the greedy students' mean accuracy, the temperature slope with its 95% interval, whether
    each condition holds, and ``passes`` with a ``reason`` naming what failed.
    """
    greedy = df[df.method == "greedy"].student_acc.to_numpy(float)
    temp = df[df.method == "temperature"]
    g = float(greedy.mean()) if greedy.size else float("nan")
    slope, lo, hi = float("nan"), float("nan"), float("nan")
    if temp.teacher_acc.nunique() >= 2:
        fit = stats.linregress(temp.teacher_acc.to_numpy(float), temp.student_acc.to_numpy(float))
        slope = float(fit.slope)
        if len(temp) > 2:
            q = stats.t.ppf(0.975, len(temp) - 2)
            lo, hi = slope - q * fit.stderr, slope + q * fit.stderr
    ok_greedy, ok_slope = bool(g >= min_greedy_student), bool(np.isfinite(slope) and slope >= min_slope)
    failed = [f"greedy-trace student {100 * g:.1f}% < {100 * min_greedy_student:g}%"] if not ok_greedy else []
    if not ok_slope:
        failed.append(f"temperature slope {slope:.3f} < {min_slope:g}" if np.isfinite(slope)
                      else "fewer than two distinct temperature teacher accuracies")
    return {"greedy_student_acc": g, "temperature_slope": slope, "slope_ci": [float(lo), float(hi)],
            "n_temperature_runs": int(len(temp)), "min_greedy_student": min_greedy_student, "min_slope": min_slope,
            "greedy_ok": ok_greedy, "slope_ok": ok_slope, "passes": ok_greedy and ok_slope,
            "reason": "; ".join(failed) or "passes"}


def gate_on_record(cfg) -> tuple[dict, str] | None:
    """The gate ``cfg.gate_from`` records for the world build of ``cfg`` (a ``SweepConfig``), and where (None
    without ``gate_from``).

    ``ValueError`` when none is recorded, when it was judged with other thresholds than ``cfg``'s, or when the
    world fails it and ``cfg.gate`` is ``"stop"``: a design that reads another design's gate runs on the worlds
    that pass it, and finds out before building anything.
    """
    if cfg.gate_from is None:
        return None
    try:
        gate, path = recorded_gate(cfg.gate_from, cfg.world)
    except ValueError as e:
        raise ValueError(f"gate_from={cfg.gate_from!r}: {e}") from None
    held = {"min_greedy_student": cfg.gate_min_greedy_student, "min_slope": cfg.gate_min_slope}
    if any(gate.get(k) != v for k, v in held.items()):
        raise ValueError(f"gate_from={cfg.gate_from!r}: the gate recorded in {path} was judged with "
                         f"{ {k: gate.get(k) for k in held} }, this config asks for {held}: the same thresholds, or "
                         "measure the gate here")
    if not gate["passes"] and cfg.gate == "stop":
        raise ValueError(f"world seed {cfg.world.seed} fails the gate recorded in {path} ({gate['reason']}); with "
                         f"gate 'stop' this design runs on worlds that pass it")
    return gate, str(path)


def keep_recorded_gate(path: Path, gate: dict, where: str) -> dict:
    """Write the recorded ``gate`` to a run's ``gate.json`` at ``path`` with ``recorded_in: where``, and return
    it; a ``gate.json`` already there (a resumed run) is kept only if it is that record (``ValueError``)."""
    if path.is_file():
        held = json.loads(path.read_text())
        if {k: v for k, v in held.items() if k != "recorded_in"} != gate:
            raise ValueError(f"{path} is not the gate recorded for this world in {where}: remove it to read the "
                             "record, or choose another run name")
    stage(path, lambda p: write_json_atomic(p, gate | {"recorded_in": where}))
    return json.loads(path.read_text())
