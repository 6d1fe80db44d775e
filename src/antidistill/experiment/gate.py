"""The world's gate: do its students learn from the teacher at all?

A poisoned trace can only show an effect if what the teacher writes changes what the student
learns. Two conditions, from a world's greedy and temperature runs alone (no defended arm):

* a student distilled on greedy traces reaches ``min_greedy_student`` test accuracy;
* under temperature sampling, student accuracy rises with teacher accuracy by at least
  ``min_slope`` student points per teacher point (OLS over the world's temperature runs).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


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
