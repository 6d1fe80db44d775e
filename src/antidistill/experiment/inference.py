"""The primary estimate: a pooled model over all runs, with an interval that stays sound with few seeds.

For an arm A against temperature, every run of A whose teacher accuracy lies inside temperature's
range, and every temperature run, is one observation, and statsmodels fits

    student_acc ~ teacher_acc + teacher_acc² + [method = A] + C(cluster)

by OLS. The coefficient of ``[method = A]`` is the arm's effect at matched teacher accuracy (one
number, from all runs; no level rests on one run). ``cluster`` is a (world build, seed) pair: runs
of one seed share their distillation seed, and runs of one world share its weights, so the cluster
fixed effect takes out what they share. teacher_acc² lets the shared curve bend; the range
restriction keeps the fit from extrapolating temperature's curve to any run of A.

The 95% interval is the *union* of two intervals, so it is never narrower than either:

* HC3 heteroskedasticity-robust standard error with a t quantile on the residual degrees of freedom;
* a cluster bootstrap that resamples (world, seed) clusters with replacement and refits.

With many clusters the two agree. With the demo's few seeds the percentile bootstrap alone is
anti-conservative (with 2 clusters it has 3 distinct resamples), which the null-simulation test
(tests/test_inference.py) would catch; HC3 then carries the interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats

N_BOOT = 1000
LEVEL = 0.95


def _cluster(df: pd.DataFrame) -> pd.Series:
    world = df["world"].astype(str) if "world" in df.columns else pd.Series("w", index=df.index)
    return world + "/s" + df["seed"].astype(str)


def overlap(df: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """The runs of arm ``a`` inside the teacher-accuracy range of baseline ``b``, and every run of ``b``.

    The baseline's curve is only interpolated, never extrapolated, at the arm's runs; baseline runs
    beyond the arm's range still inform the shared curve (an arm whose runs sit in a narrow band
    inside the baseline's range, as the white-box arms do, is compared there).
    """
    ra, rb = df[df.method == a], df[df.method == b]
    if ra.empty or rb.empty:
        return df.iloc[:0]
    lo, hi = rb.teacher_acc.min(), rb.teacher_acc.max()
    return pd.concat([ra[(ra.teacher_acc >= lo - 1e-12) & (ra.teacher_acc <= hi + 1e-12)], rb])


def _design(is_arm: np.ndarray, x: np.ndarray, clusters: np.ndarray, is_other: np.ndarray | None = None) -> np.ndarray:
    xc = x - x.mean()
    cols = [is_arm.astype(float)] + ([] if is_other is None else [is_other.astype(float)]) + [xc, xc**2]
    levels = np.unique(clusters)
    cols += [(clusters == c).astype(float) for c in levels]  # one intercept per cluster
    return np.column_stack(cols)


def pooled_effect(df: pd.DataFrame, arm: str, baseline: str = "temperature", *, y: str = "student_acc",
                  n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL, via: str | None = None) -> dict | None:
    """``arm − baseline`` in ``y`` at matched teacher accuracy: estimate, interval and how it was made.

    ``via``: compare two arms through a reference curve (e.g. white-box − its permutation, both
    against temperature's curve): runs of both arms inside ``via``'s range and every ``via`` run
    enter one fit, and the estimate is the difference of the two arms' coefficients.
    Returns None if there are too few runs to fit (fewer than 2 runs of either side, or no
    residual degrees of freedom).
    """
    ref = via or baseline
    sub = overlap(df, arm, ref)
    if via is not None:
        sub = pd.concat([sub, overlap(df, baseline, ref)[lambda d: d.method == baseline]])
    sub = sub[np.isfinite(sub[y].to_numpy(float))]
    n_arm, n_base = int((sub.method == arm).sum()), int((sub.method == baseline).sum())
    if n_arm < 2 or n_base < 2:
        return None
    clusters = _cluster(sub).to_numpy()
    is_arm, x, yv = (sub.method == arm).to_numpy(), sub.teacher_acc.to_numpy(float), sub[y].to_numpy(float)
    is_other = (sub.method == baseline).to_numpy() if via is not None else None
    X = _design(is_arm, x, clusters, is_other)
    if np.linalg.matrix_rank(X) < X.shape[1] or len(yv) - X.shape[1] < 2:
        return None
    fit = sm.OLS(yv, X).fit(cov_type="HC3")
    c = np.zeros(X.shape[1])
    c[0] = 1.0
    if via is not None:
        c[1] = -1.0
    est = float(c @ fit.params)
    se = float(np.sqrt(c @ np.asarray(fit.cov_params()) @ c))
    q = stats.t.ppf(0.5 + level / 2, fit.df_resid)
    lo_t, hi_t = est - q * se, est + q * se
    boot = _cluster_bootstrap(is_arm, x, yv, clusters, n_boot, seed, is_other)
    if boot.size >= max(20, n_boot // 4):
        lo_b, hi_b = (float(v) for v in np.percentile(boot, [50 - 50 * level, 50 + 50 * level]))
    else:
        lo_b, hi_b = lo_t, hi_t
    lo_ci, hi_ci = min(lo_t, lo_b), max(hi_t, hi_b)
    return {"arm": arm, "baseline": baseline, "y": y, "estimate": est, "ci_low": lo_ci, "ci_high": hi_ci,
            "hc3_ci": [lo_t, hi_t], "bootstrap_ci": [lo_b, hi_b], "se_hc3": se, "n_runs": len(sub),
            "n_arm": n_arm, "n_baseline": n_base, "n_clusters": int(np.unique(clusters).size),
            "teacher_range": [float(sub.teacher_acc.min()), float(sub.teacher_acc.max())],
            "significant": bool(hi_ci < 0 or lo_ci > 0)}


def _cluster_bootstrap(is_arm, x, yv, clusters, n_boot, seed, is_other=None) -> np.ndarray:
    """The method coefficient over resamples of whole clusters (a drawn cluster twice counts as two)."""
    rng = np.random.default_rng(seed)
    levels = np.unique(clusters)
    index = {c: np.flatnonzero(clusters == c) for c in levels}
    out = []
    for _ in range(n_boot):
        draw = rng.choice(levels, size=levels.size, replace=True)
        idx = np.concatenate([index[c] for c in draw])
        labels = np.concatenate([np.full(index[c].size, k) for k, c in enumerate(draw)])
        X = _design(is_arm[idx], x[idx], labels, None if is_other is None else is_other[idx])
        if np.linalg.matrix_rank(X) < X.shape[1]:
            continue  # one method missing from the draw, or too few distinct teacher accuracies
        beta = np.linalg.lstsq(X, yv[idx], rcond=None)[0]
        out.append(beta[0] - (beta[1] if is_other is not None else 0.0))
    return np.asarray(out)


def verdict_sentence(effect: dict | None, max_student_acc: float | None = None) -> str:
    """The report's verdict, from the pooled antidistillation − temperature estimate alone."""
    if effect is None:
        return ("Not enough runs of antidistillation and temperature overlap in teacher accuracy to fit the pooled "
                "model: no verdict.")
    e = effect
    lo, hi = e["teacher_range"]
    what = (f"{100 * e['estimate']:+.1f} points (95% CI {100 * e['ci_low']:+.1f} to {100 * e['ci_high']:+.1f}; "
            f"pooled model over {e['n_runs']} runs in {e['n_clusters']} seed clusters, teacher accuracy "
            f"{lo:.2f}–{hi:.2f})")
    floor = ""
    if max_student_acc is not None and max_student_acc < 0.25:
        floor = (f" Caveat: every distilled student scores at most {100 * max_student_acc:.0f}% on test, near the "
                 "floor, so accuracy has little room to show a difference.")
    if e["ci_high"] < 0:
        return ("**The claim holds here.** At matched teacher accuracy (scored on the delivered traces), students "
                f"distilled from antidistillation traces are worse than students of temperature traces: {what}." + floor)
    if e["ci_low"] > 0:
        return ("**The claim does not hold here.** At matched teacher accuracy, students of antidistillation traces "
                f"are *better* than students of temperature traces: {what}." + floor)
    return ("**Not shown.** At matched teacher accuracy the student-accuracy difference (antidistillation − "
            f"temperature) is {what}; the interval includes zero." + floor)


def ladder_effects(df: pd.DataFrame, *, n_boot: int = N_BOOT) -> dict[str, dict | None]:
    """Each ladder arm against temperature, and white-box against its own permutation."""
    out = {a: pooled_effect(df, a, n_boot=n_boot) for a in
           ("antidistill", "permutation", "reasoning_only", "whitebox", "whitebox_permutation")
           if (df.method == a).any()}
    if (df.method == "whitebox").any() and (df.method == "whitebox_permutation").any():
        out["whitebox_vs_permutation"] = pooled_effect(df, "whitebox", "whitebox_permutation", n_boot=n_boot,
                                                       via="temperature")
    return out


def _worse(e: dict | None) -> bool:
    return e is not None and e["ci_high"] < 0


def _alike(e: dict | None) -> bool:
    return e is not None and e["ci_low"] <= 0 <= e["ci_high"]


def ladder_reading(effects: dict[str, dict | None]) -> str:
    """The transfer ladder's reading, written out (the issue's three cases, and the rest)."""
    wb, wbp = effects.get("whitebox"), effects.get("whitebox_vs_permutation")
    wbp_t, ad = effects.get("whitebox_permutation"), effects.get("antidistill")
    if wb is None or wbp is None or wbp_t is None:
        return "The white-box arms were not run (or do not overlap temperature in teacher accuracy): no ladder reading."
    if _worse(wb) and _worse(wbp) and not _worse(ad):
        return ("**The mechanism works but does not transfer here.** White-box antidistillation hurts students more "
                "than its own permutation and than temperature, while the cross-family proxy's does not.")
    if _worse(wb) and _worse(wbp) and _worse(ad):
        return ("**The mechanism works and transfers.** White-box antidistillation hurts students more than its "
                "permutation and than temperature, and so does the cross-family proxy's.")
    if _alike(wb) and _alike(wbp_t) and _alike(wbp):
        width = max(100 * (e["ci_high"] - e["ci_low"]) / 2 for e in (wb, wbp_t, wbp))
        return ("**The mechanism does not work in this world.** White-box antidistillation, its permutation and "
                f"temperature give students alike (every interval includes zero; half-widths up to {width:.1f} "
                "points, so only effects larger than that are ruled out).")
    if _alike(wbp) and _worse(wb) and _worse(wbp_t):
        return ("**The damage is noise.** White-box antidistillation and its permutation are alike, and both are "
                "worse than temperature: any perturbation of this size hurts, not the direction Δ̂.")
    return ("**No clean reading.** The ladder's intervals fit none of the three patterns: white-box − temperature "
            f"{_pts(wb)}, white-box − its permutation {_pts(wbp)}, permuted white-box − temperature {_pts(wbp_t)}, "
            f"cross-family − temperature {_pts(ad)}.")


def _pts(e: dict | None) -> str:
    if e is None:
        return "(not fitted)"
    return f"{100 * e['estimate']:+.1f} [{100 * e['ci_low']:+.1f}, {100 * e['ci_high']:+.1f}]"
