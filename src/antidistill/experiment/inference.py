"""Arm effects at matched teacher accuracy, with intervals whose unit of replication is the world build.

A *world build* (a toy world built from one seed, or one real-model setup) is what the next owner
gets anew, so it is the unit the intervals generalise over. Within a world, every run of an arm is
compared with the baseline (temperature) at the same teacher accuracy; across worlds, the per-world
effects are averaged and the interval is a t interval on K − 1 degrees of freedom (K world builds).
The arm effect may differ from world to world (a random effect); the interval covers the mean of
that distribution, which is the claim a model owner needs about the next build.

**Within a world** (``run_effects``), the effect of one arm run on ``y`` (student accuracy, or
student NLL) is

    d = (y_arm − y_base) − b_w · (x_arm − x_base)

* paired design (the runs carry a ``target``: the calibrated teacher-accuracy target, in points
  relative to the world's best undefended teacher): the baseline run is the one with the same
  world, seed and target, so the comparison is local and needs no curve;
* without targets (older runs, config grids): ``y_base`` and ``x_base`` are the world's baseline
  line at ``x_arm`` (only for arm runs inside the baseline's teacher-accuracy range).

``b_w`` is the slope of ``y`` on teacher accuracy over the world's baseline runs (OLS); it removes
the small calibration mismatch ``x_arm − x_base``. A world's effect is the mean of its runs' ``d``.

**Across worlds** (``pooled_effect``): K ≥ 2 worlds give the mean of the world effects with a
t(K−1) interval (``claim="next world build"``). One world gives that world's estimate with a
within-world interval: a t interval over its seeds when it has several, else the binomial
test-sampling error of the runs (``claim="this world build only"``); it is never a finding about
the method.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
PRIMARY_TARGET = -5.0  # the pre-registered primary endpoint: student accuracy at the −5-point target
PLANNED_WORLDS = 10  # the pre-registered primary is read over the first this many world builds that pass the gate
NEXT_WORLD = "next world build"
THIS_WORLD = "this world build only"


def _world(df: pd.DataFrame) -> pd.Series:
    return df["world"].astype(str) if "world" in df.columns else pd.Series("w", index=df.index)


def _has_targets(df: pd.DataFrame) -> bool:
    return "target" in df.columns and df["target"].notna().any()


# a world's baseline runs fit a slope when their teacher accuracies vary by more than this (in squares)
MIN_SLOPE_SPREAD = 1e-12


def world_slopes(base: pd.DataFrame, y: str) -> pd.Series:
    """Per world: the OLS slope of ``y`` on ``teacher_acc`` over its baseline runs (0 where ``slope_worlds``
    finds no spread of teacher accuracy to fit one)."""
    b = base[["world", "teacher_acc", y]].dropna()
    g = b.groupby("world")
    xm, ym = g.teacher_acc.transform("mean"), g[y].transform("mean")
    cov = ((b.teacher_acc - xm) * (b[y] - ym)).groupby(b.world).sum()
    var = ((b.teacher_acc - xm) ** 2).groupby(b.world).sum()
    return (cov / var.where(var > MIN_SLOPE_SPREAD)).fillna(0.0)


def slope_worlds(df: pd.DataFrame, baseline: str = "temperature") -> pd.Series:
    """Per world (sorted): whether its ``baseline`` runs' teacher accuracies spread enough for ``world_slopes``
    to fit a slope, and so for a paired difference to be adjusted by it.

    >>> slope_worlds(pd.DataFrame({"method": ["temperature"] * 3, "world": ["a", "a", "b"],
    ...                            "teacher_acc": [0.9, 0.8, 0.85]})).to_dict()
    {'a': True, 'b': False}
    """
    df = df.assign(world=_world(df))
    x = df[df.method == baseline].teacher_acc.astype(float)
    spread = ((x - x.groupby(df.world).transform("mean")) ** 2).groupby(df.world).sum()
    return (spread > MIN_SLOPE_SPREAD).reindex(sorted(df.world.unique()), fill_value=False)


def _binomial_var(acc, n):
    return acc * (1 - acc) / np.maximum(n, 1)


def run_effects(df: pd.DataFrame, baseline: str = "temperature", *, y: str = "student_acc",
                adjust: bool = True) -> pd.DataFrame:
    """One row per run of every other arm that has a comparable baseline run:
    ``method, world, seed, target, d, var, x_arm, x_base``.

    ``var`` is the run's binomial test-sampling variance of ``d`` (accuracy outcomes; 0 for others).
    ``adjust=False``: a paired run's ``d`` is the plain difference, without the world's teacher-accuracy
    slope (for rows of one target, where the baseline's runs span no range of teacher accuracy).
    """
    df = df.assign(world=_world(df))
    if "n_test" not in df.columns:
        df = df.assign(n_test=np.inf)
    if "target" not in df.columns:
        df = df.assign(target=np.nan)
    base, runs = df[df.method == baseline], df[df.method != baseline]
    slope = world_slopes(base, y) if adjust else world_slopes(base, y) * 0.0
    acc = y.endswith("_acc")
    paired = runs[runs.target.notna()].merge(base[["world", "seed", "target", "teacher_acc", y, "n_test"]],
                                             on=["world", "seed", "target"], suffixes=("", "_b"))
    b = paired.world.map(slope).to_numpy(float)
    xa, xb, ya, yb = (paired[c].to_numpy(float) for c in ("teacher_acc", "teacher_acc_b", y, f"{y}_b"))
    na, nb = paired.n_test.to_numpy(float), paired.n_test_b.to_numpy(float)
    out = [pd.DataFrame({
        "method": paired.method.to_numpy(), "world": paired.world.to_numpy(), "seed": paired.seed.to_numpy(),
        "target": paired.target.to_numpy(float), "d": (ya - yb) - b * (xa - xb),
        "var": (_binomial_var(ya, na) + _binomial_var(yb, nb) + b**2 * (_binomial_var(xa, na) + _binomial_var(xb, nb)))
        if acc else np.zeros(len(paired)), "x_arm": xa, "x_base": xb})]
    # runs without a target (older designs): against the world's baseline line, inside its range
    loose = runs[runs.target.isna()]
    if len(loose):
        g = base.groupby("world")
        line = pd.DataFrame({"lo": g.teacher_acc.min(), "hi": g.teacher_acc.max(), "xm": g.teacher_acc.mean(),
                             "ym": g[y].mean(), "nx": g.teacher_acc.nunique(), "b": slope})
        m = loose.join(line, on="world", how="inner")
        m = m[(m.nx >= 2) & (m.teacher_acc >= m.lo - 1e-12) & (m.teacher_acc <= m.hi + 1e-12)]
        xa, ya = m.teacher_acc.to_numpy(float), m[y].to_numpy(float)
        out.append(pd.DataFrame({
            "method": m.method.to_numpy(), "world": m.world.to_numpy(), "seed": m.seed.to_numpy(), "target": np.nan,
            "d": ya - (m.ym.to_numpy(float) + m.b.to_numpy(float) * (xa - m.xm.to_numpy(float))),
            "var": _binomial_var(ya, m.n_test.to_numpy(float)) if acc else np.zeros(len(m)), "x_arm": xa,
            "x_base": xa}))
    return pd.concat([o for o in out if len(o)] or out[:1], ignore_index=True)


def world_effects(runs: pd.DataFrame, arm: str, *, target: float | None = None, other: str | None = None) -> pd.DataFrame:
    """Per world, from :func:`run_effects`' table: the arm's mean effect ``d`` (at ``target``: the mean over its
    runs there; over all targets: the mean over targets of each target's mean, so a target with more seeds
    weighs no more), its binomial ``var``, ``n_runs``, and the spread over its seeds (``sd_seeds``,
    ``n_seeds``: the seeds that ran every target the world has, each seed's mean over them).

    ``other``: the contrast arm − other, each against the baseline, per world that has both.
    """
    def per_world(a: str) -> pd.DataFrame:
        r = runs[runs.method == a]
        if target is not None:
            r = r[np.isclose(r.target.to_numpy(float), target)]
        r = r.assign(cell=r.target.fillna(np.inf))  # runs without a target (older designs) form one cell
        cells = r.groupby(["world", "cell"]).agg(d=("d", "mean"), var=("var", "sum"), n=("d", "size"))
        cells["var"] = cells["var"] / cells.n ** 2
        g = cells.groupby("world")
        full = r.groupby(["world", "seed"]).cell.nunique().eq(r.groupby("world").cell.nunique(), level="world")
        by_seed = r.set_index(["world", "seed"]).loc[full[full].index].groupby(["world", "seed"]).d.mean()
        by_seed = by_seed.groupby("world")
        out = pd.DataFrame({"d": g.d.mean(), "var": g["var"].sum() / g.size() ** 2, "n_runs": g.n.sum(),
                            "sd_seeds": by_seed.std(ddof=1), "n_seeds": by_seed.size()})
        return out.assign(n_seeds=out.n_seeds.fillna(0).astype(int))
    a = per_world(arm)
    if other is not None:
        o = per_world(other)
        a = a.join(o, rsuffix="_o", how="inner")
        a = pd.DataFrame({"d": a.d - a.d_o, "var": a["var"] + a["var_o"], "n_runs": a.n_runs + a.n_runs_o,
                          "sd_seeds": np.nan, "n_seeds": np.minimum(a.n_seeds, a.n_seeds_o)})
    return a.reset_index()


@functools.lru_cache(maxsize=256)
def _t_quantile(level: float, dof: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, dof)) if np.isfinite(dof) else float(stats.norm.ppf(0.5 + level / 2))


def summarize(we: pd.DataFrame, level: float = LEVEL) -> dict | None:
    """The interval from per-world effects: t(K−1) over K ≥ 2 worlds; one world: its own interval."""
    if we.empty:
        return None
    k = len(we)
    d = we["d"].to_numpy(float)
    est = float(d.mean())
    seeds_only = False  # one world and one run: the interval counts test-set sampling, not the seed's variation
    if k >= 2:
        se, q, df_, claim = float(d.std(ddof=1) / np.sqrt(k)), _t_quantile(level, k - 1), k - 1, NEXT_WORLD
    else:
        n, sd = int(we["n_seeds"].iloc[0]), float(we["sd_seeds"].iloc[0])
        if n >= 2 and np.isfinite(sd):
            se, q, df_ = sd / np.sqrt(n), _t_quantile(level, n - 1), n - 1
        else:  # one run: its test-sampling variance, known for accuracy outcomes only (0 means unknown)
            seeds_only = True
            var = float(we["var"].iloc[0])
            se, q, df_ = (np.sqrt(var) if var > 0 else float("nan")), _t_quantile(level, float("inf")), float("inf")
        claim = THIS_WORLD
    lo, hi = est - q * se, est + q * se
    return {"estimate": est, "ci_low": lo, "ci_high": hi, "se": se, "df": df_, "n_worlds": k, "claim": claim,
            "test_sampling_only": seeds_only,
            "n_runs": int(we["n_runs"].to_numpy().sum()), "worlds": dict(zip(map(str, we["world"].tolist()), d.tolist())),
            "significant": bool(hi < 0 or lo > 0)}  # False when there is no interval (NaN)


def pooled_effect(df: pd.DataFrame, arm: str, baseline: str = "temperature", *, y: str = "student_acc",
                  target: float | None = None, other: str | None = None, level: float = LEVEL,
                  runs: pd.DataFrame | None = None, adjust: bool = True) -> dict | None:
    """``arm − baseline`` (or ``arm − other``, both against ``baseline``) in ``y`` at matched teacher accuracy.

    Returns estimate, interval, the kind of claim it makes and the per-world effects, or None when
    no world has a comparable pair of runs. ``runs``: a precomputed :func:`run_effects` table.
    ``adjust``: see :func:`run_effects`.
    """
    runs = run_effects(df, baseline, y=y, adjust=adjust) if runs is None else runs
    e = summarize(world_effects(runs, arm, target=target, other=other), level)
    if e is None:
        return None
    mine = runs[runs.method == arm]
    return {"arm": arm, "baseline": other or baseline, "y": y, "target": target, **e,
            "teacher_range": [float(mine.x_arm.min()), float(mine.x_arm.max())]}


def targets_of(df: pd.DataFrame) -> list[float]:
    """The design's targets present in ``df`` (points relative to the best undefended teacher), high to low."""
    return sorted({float(t) for t in df["target"].dropna()}, reverse=True) if _has_targets(df) else []


def primary_effect(df: pd.DataFrame, arm: str = "antidistill", *, y: str = "student_acc",
                   runs: pd.DataFrame | None = None) -> dict | None:
    """The pre-registered endpoint: at the −5-point target when the design has targets, else over all runs."""
    target = PRIMARY_TARGET if PRIMARY_TARGET in targets_of(df) else None
    return pooled_effect(df, arm, y=y, target=target, runs=runs)


def _pts(e: dict | None, scale: float = 100.0) -> str:
    if e is None:
        return "(not fitted)"
    return f"{scale * e['estimate']:+.1f} [{scale * e['ci_low']:+.1f}, {scale * e['ci_high']:+.1f}]"


def claim_note(e: dict) -> str:
    if e["claim"] == NEXT_WORLD:
        return (f"{e['n_worlds']} world builds, t({e['n_worlds'] - 1}) interval: a claim about the mean effect over "
                "world builds made like these, the next one included")
    note = "one world build: an estimate for this build only, not a finding about the method"
    if e.get("test_sampling_only"):
        note += "; one run, so the interval counts test-set sampling only, not the distillation seed's variation"
    return note


def verdict_sentence(effect: dict | None, max_student_acc: float | None = None) -> str:
    """The report's verdict, from the primary antidistillation − temperature estimate alone."""
    if effect is None:
        return ("No antidistillation run has a temperature run to compare with at matched teacher accuracy: "
                "no verdict.")
    e = effect
    where = f" at the {e['target']:+g}-point target" if e.get("target") is not None else ""
    what = f"{_pts(e)} points{where} (95% CI; {claim_note(e)})"
    floor = ""
    if max_student_acc is not None and max_student_acc < 0.25:
        floor = (f" Caveat: every distilled student scores at most {100 * max_student_acc:.0f}% on test, near the "
                 "floor, so accuracy has little room to show a difference.")
    if e["claim"] == THIS_WORLD:
        return (f"**One world build: no verdict.** Antidistillation − temperature in this world: {what}. See the "
                "pooled result over many builds (docs/results/full)." + floor)
    if e.get("target") == PRIMARY_TARGET and e["n_worlds"] < PLANNED_WORLDS:
        so_far = ("below zero, the claim's direction" if e["ci_high"] < 0 else
                  "above zero: students of antidistillation traces are *better*, against the claim"
                  if e["ci_low"] > 0 else "across zero")
        return (f"**Interim: {e['n_worlds']} of the {PLANNED_WORLDS} pre-registered world builds, so no verdict yet.** "
                f"At matched teacher accuracy, antidistillation − temperature is {what}; so far the interval lies "
                f"{so_far}. The pre-registered reading is made over the first {PLANNED_WORLDS} builds that pass the "
                "gate; the campaign does not stop on an interim result." + floor)
    if e["ci_high"] < 0:
        return ("**The claim holds.** At matched teacher accuracy (scored on the delivered traces), students of "
                f"antidistillation traces are worse than students of temperature traces: {what}." + floor)
    if e["ci_low"] > 0:
        return ("**The claim does not hold.** At matched teacher accuracy, students of antidistillation traces are "
                f"*better* than students of temperature traces: {what}." + floor)
    return ("**Not shown.** At matched teacher accuracy the student-accuracy difference (antidistillation − "
            f"temperature) is {what}; the interval includes zero." + floor)


LADDER_ARMS = ("antidistill", "permutation", "reasoning_only", "whitebox", "whitebox_permutation")


def ladder_effects(df: pd.DataFrame, *, target: float | None = None, y: str = "student_acc",
                   runs: pd.DataFrame | None = None) -> dict[str, dict | None]:
    """Each ladder arm against temperature, and white-box against its own permutation."""
    runs = run_effects(df, y=y) if runs is None else runs
    out = {a: pooled_effect(df, a, y=y, target=target, runs=runs) for a in LADDER_ARMS if (df.method == a).any()}
    if (df.method == "whitebox").any() and (df.method == "whitebox_permutation").any():
        out["whitebox_vs_permutation"] = pooled_effect(df, "whitebox", y=y, other="whitebox_permutation",
                                                       target=target, runs=runs)
    return out


def _worse(e: dict | None) -> bool:
    return e is not None and e["ci_high"] < 0


def _alike(e: dict | None) -> bool:
    return e is not None and e["ci_low"] <= 0 <= e["ci_high"]


def ladder_reading(effects: dict[str, dict | None]) -> str:
    """The transfer ladder's reading, written out (three named cases, and the rest)."""
    wb, wbp = effects.get("whitebox"), effects.get("whitebox_vs_permutation")
    wbp_t, ad = effects.get("whitebox_permutation"), effects.get("antidistill")
    if wb is None:
        return "The white-box arm was not run (or has no matched temperature runs): no ladder reading."
    if wbp is None or wbp_t is None:
        return ("The white-box permutation arm was not run (or has no matched runs): the ladder needs white-box, its "
                "permutation and temperature, so there is no ladder reading.")
    if any(e["claim"] == THIS_WORLD for e in (wb, wbp, wbp_t)):
        return ("One world build: the ladder is this build's estimate only, no reading about the method "
                f"(white-box − temperature {_pts(wb)}, white-box − its permutation {_pts(wbp)}).")
    if _worse(wb) and _worse(wbp) and not _worse(ad):
        return ("**The mechanism works; the cross-family proxy's transfer is not shown.** White-box antidistillation "
                "hurts students more than its own permutation and than temperature; the cross-family proxy's "
                f"effect {_pts(ad)} does not exclude zero (which does not show it is zero).")
    if _worse(wb) and _worse(wbp) and _worse(ad):
        return ("**The mechanism works and transfers.** White-box antidistillation hurts students more than its "
                "permutation and than temperature, and so does the cross-family proxy's.")
    if _alike(wb) and _alike(wbp_t) and _alike(wbp):
        width = max(100 * (e["ci_high"] - e["ci_low"]) / 2 for e in (wb, wbp_t, wbp))
        return ("**The mechanism is not shown to work.** White-box antidistillation, its permutation and "
                f"temperature give students alike (every interval includes zero; half-widths up to {width:.1f} "
                "points, so only effects larger than that are ruled out).")
    if _alike(wbp) and _worse(wb) and _worse(wbp_t):
        return ("**The damage is noise.** White-box antidistillation and its permutation are alike, and both are "
                "worse than temperature: any perturbation of this size hurts, not the direction Δ̂.")
    return ("**No clean reading.** The ladder's intervals fit none of the named patterns: white-box − temperature "
            f"{_pts(wb)}, white-box − its permutation {_pts(wbp)}, permuted white-box − temperature {_pts(wbp_t)}, "
            f"cross-family − temperature {_pts(ad)}.")
