"""The distiller × arm table: each defense's gap to temperature under each distiller, and how much of the naive
gap an adaptive distiller recovers.

The comparison is fair when a distiller's variant is applied to the temperature traces too: the gap of arm A
under distiller D is the arm effect estimated from D's runs alone (A's and temperature's, at matched teacher
accuracy). The estimator is passed in (``inference.pooled_effect`` today), so this table follows whatever
estimate the report uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from .distillers import DISTILLERS, NAIVE

# (runs of one distiller, arm) -> {"estimate", "ci_low", "ci_high", ...} or None when it cannot be fitted
Estimator = Callable[[pd.DataFrame, str], "dict | None"]

COLUMNS = ("distiller", "arm", "estimate", "ci_low", "ci_high", "n_runs", "naive_estimate", "recovered",
           "arm_level", "temperature_level")


def recovered_fraction(gap: float, naive_gap: float, harm: int = -1) -> float:
    """The share of the naive gap a distiller recovers: 1 − gap / naive_gap (1: no gap left; 0: the naive gap;
    < 0: a larger gap than naive). ``harm``: the sign of a gap that hurts the student, −1 where lower is worse
    (accuracy), +1 where higher is worse (NLL). NaN when the naive distiller shows no such gap to recover.

    >>> recovered_fraction(-2.0, -8.0)
    0.75
    >>> recovered_fraction(0.75, 0.5, harm=+1)  # an NLL gap that grew by half
    -0.5
    """
    if isinstance(harm, bool) or harm not in (-1, 1):
        raise ValueError(f"harm must be -1 (lower is worse) or +1 (higher is worse), got {harm!r}")
    if not harm * naive_gap > 0:
        return float("nan")
    return 1.0 - gap / naive_gap


def distiller_table(df: pd.DataFrame, estimator: Estimator, arms: Sequence[str] = ("whitebox", "antidistill"),
                    level: str | None = None, harm: int = -1) -> pd.DataFrame:
    """One row per (distiller, arm): the arm's gap to temperature under that distiller, and the share of the
    naive gap it recovers.

    Args:
        df: results rows with ``distiller`` (rows without one are the naive distiller's), ``method`` and
            whatever ``estimator`` reads.
        estimator: ``(runs, arm) -> dict | None``, the arm-effect estimator (e.g. ``inference.pooled_effect``),
            called on one distiller's runs at a time; its ``estimate``, ``ci_low``, ``ci_high`` and ``n_runs``
            (if present) are copied.
        arms: the defended arms, each against temperature.
        level: a column of ``df`` (e.g. ``student_acc``) whose mean over the distiller's runs of the arm and of
            temperature is given beside the gap (``arm_level``, ``temperature_level``), so a variant whose
            students all collapse, which makes every gap small, shows as such; NaN without it.
        harm: the sign of a gap that hurts the student (:func:`recovered_fraction`): −1 for accuracy, +1 for NLL.

    Returns:
        A frame with :data:`COLUMNS`; ``recovered`` is :func:`recovered_fraction` of the point estimates (the
        naive row's own is 0), NaN where either gap could not be fitted. Distillers come in
        ``experiment.distillers`` order. The fraction has no interval: it is a ratio of two estimates.
    """
    runs = df.assign(distiller=df["distiller"].fillna(NAIVE)) if "distiller" in df else df.assign(distiller=NAIVE)
    present = [d for d in DISTILLERS if (runs.distiller == d).any()]
    present += sorted(set(runs.distiller) - set(present))
    fits = {(d, a): estimator(runs[runs.distiller == d], a) for d in present for a in arms}
    nan = float("nan")

    def mean_level(d, method):
        sub = runs[(runs.distiller == d) & (runs.method == method)]
        return float(sub[level].mean()) if level is not None and len(sub) else nan

    rows = []
    for d in present:
        for a in arms:
            e, naive = fits[(d, a)], fits.get((NAIVE, a))
            est = e["estimate"] if e else nan
            naive_est = naive["estimate"] if naive else nan
            rows.append({"distiller": d, "arm": a, "estimate": est, "ci_low": e["ci_low"] if e else nan,
                         "ci_high": e["ci_high"] if e else nan, "n_runs": e.get("n_runs") if e else None,
                         "naive_estimate": naive_est,
                         "recovered": recovered_fraction(est, naive_est, harm) if e and naive else nan,
                         "arm_level": mean_level(d, a), "temperature_level": mean_level(d, "temperature")})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def distiller_table_lines(table: pd.DataFrame, *, scale: float = 100.0, digits: int = 1, unit: str = "points",
                          level_name: str = "students") -> list[str]:
    """The table as report markdown: gaps (× ``scale``, in ``unit``) with their intervals, the recovered share
    in %. Accuracy gaps are fractions shown in points (the default); an NLL gap takes ``scale=1``. Where the
    table has levels (``arm_level``), a column (``level_name``) gives the mean of the arm's and temperature's
    students."""
    def pts(v):
        return "–" if pd.isna(v) else f"{scale * v:+.{digits}f}"

    levels = "arm_level" in table and table.arm_level.notna().any()
    head = f" {level_name}: arm / temperature (mean) |" if levels else ""
    out = [f"| distiller | arm | gap to temperature ({unit}, 95% CI) | runs | naive gap recovered |{head}",
           "|---|---|---|---|---|" + ("---|" if levels else "")]
    for r in table.itertuples():
        gap = "–" if pd.isna(r.estimate) else f"{pts(r.estimate)} [{pts(r.ci_low)}, {pts(r.ci_high)}]"
        rec = "–" if pd.isna(r.recovered) else f"{100 * r.recovered:.0f}%"
        runs = "–" if r.n_runs is None or pd.isna(r.n_runs) else str(int(r.n_runs))
        level = (f" {scale * r.arm_level:.{digits}f} / {scale * r.temperature_level:.{digits}f} |"
                 if levels else "")
        out.append(f"| {r.distiller} | {r.arm} | {gap} | {runs} | {rec} |{level}")
    return out
