"""Plots, the matched-teacher-accuracy table, and ``report.md``.

Curves are the mean and 95% band of bootstrapped LOWESS fits (statsmodels), as in the paper's
appendix B.2: each bootstrap draw resamples a method's (teacher accuracy, student accuracy) points
with replacement and fits LOWESS on a common grid of teacher accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from statsmodels.nonparametric.smoothers_lowess import lowess

from ..io_utils import write_text_atomic
from .plotting import png_figure
from .rundir import RunDir

N_BOOT = 300
LOWESS_FRAC = 0.8
COLORS = {"temperature": "tab:blue", "antidistill": "tab:red", "permutation": "tab:gray", "greedy": "k"}


def bootstrap_lowess(x: np.ndarray, y: np.ndarray, grid: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0,
                     frac: float = LOWESS_FRAC, clip: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
    """``(n_boot, len(grid))`` LOWESS fits of y on x over bootstrap resamples (NaN outside each draw's x-range)."""
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, len(grid)), np.nan)
    n = len(x)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        xb, yb = x[idx], y[idx]
        if np.unique(xb).size < 3:
            continue
        fit = lowess(yb, xb, frac=frac, it=0, xvals=grid)
        fit[(grid < xb.min()) | (grid > xb.max())] = np.nan
        out[b] = np.clip(fit, *clip) if clip else fit
    return out


def _curves(df, methods, grid, y: str = "student_acc"):
    curves = {}
    clip = (0.0, 1.0) if y == "student_acc" else None
    for i, m in enumerate(methods):
        sub = df[df.method == m]
        if len(sub) >= 3 and sub.teacher_acc.nunique() >= 3:
            curves[m] = bootstrap_lowess(sub.teacher_acc.to_numpy(float), sub[y].to_numpy(float), grid, seed=i, clip=clip)
    return curves


def matched_table(df, levels: np.ndarray | None = None, y: str = "student_acc") -> list[dict]:
    """``y`` per method at matched teacher accuracy, antidistillation − temperature with a 95% CI.

    The levels span the teacher accuracies both curves cover (no extrapolation past either).
    """
    ad, temp = df[df.method == "antidistill"], df[df.method == "temperature"]
    if ad.empty or temp.empty:
        return []
    lo = max(ad.teacher_acc.min(), temp.teacher_acc.min())
    hi = min(ad.teacher_acc.max(), temp.teacher_acc.max())
    if levels is None:
        levels = np.linspace(lo, hi, 5) if hi > lo else np.array([lo])
    curves = _curves(df, ["antidistill", "temperature", "permutation"], levels, y)
    rows = []
    for j, level in enumerate(levels):
        row = {"teacher_acc": float(level)}
        for m in ("antidistill", "temperature", "permutation"):
            c = curves.get(m)
            row[m] = float(np.nanmean(c[:, j])) if c is not None and np.isfinite(c[:, j]).any() else float("nan")
        if "antidistill" in curves and "temperature" in curves:
            diff = curves["antidistill"][:, j] - curves["temperature"][:, j]
            diff = diff[np.isfinite(diff)]
            if diff.size:
                row["diff"] = float(diff.mean())
                row["diff_ci_low"], row["diff_ci_high"] = (float(v) for v in np.percentile(diff, [2.5, 97.5]))
        rows.append(row)
    return rows


def verdict(table: list[dict], max_student_acc: float | None = None) -> str:
    """Plain language, from the CIs alone.

    The claim "holds" only if the antidistillation student is significantly worse at a majority of
    the matched levels and better at none; a minority of significant levels is reported as weak
    evidence. Students near the floor are flagged: there is little room to show an effect.
    """
    rows = [r for r in table if "diff" in r]
    if not rows:
        return ("Not enough overlap between the antidistillation and temperature curves to compare students at "
                "matched teacher accuracy: no verdict.")
    worse = [r for r in rows if r["diff_ci_high"] < 0]
    better = [r for r in rows if r["diff_ci_low"] > 0]
    span = f"teacher accuracy {rows[0]['teacher_acc']:.2f}–{rows[-1]['teacher_acc']:.2f}"
    floor = ""
    if max_student_acc is not None and max_student_acc < 0.25:
        floor = (f" Caveat: every distilled student scores at most {100 * max_student_acc:.0f}% on test, near the "
                 "floor, so accuracy has little room to show a difference.")
    if worse and not better and 2 * len(worse) <= len(rows):
        best = min(worse, key=lambda r: r["diff"])
        return (f"**Weak evidence at best.** The antidistillation student is significantly worse at only "
                f"{len(worse)} of {len(rows)} matched levels ({span}); the largest gap is "
                f"{100 * best['diff']:.1f} points at teacher accuracy {best['teacher_acc']:.2f} "
                f"(95% CI {100 * best['diff_ci_low']:.1f} to {100 * best['diff_ci_high']:.1f}). Elsewhere the CIs "
                "include zero. This is not the paper's clear effect." + floor)
    if worse and not better:
        best = min(worse, key=lambda r: r["diff"])
        return (f"**The claim holds here.** At matched teacher accuracy, students distilled from antidistillation "
                f"traces are worse than students of temperature traces at {len(worse)} of {len(rows)} levels "
                f"({span}); the largest gap is {100 * best['diff']:.1f} points at teacher accuracy "
                f"{best['teacher_acc']:.2f} (95% CI {100 * best['diff_ci_low']:.1f} to {100 * best['diff_ci_high']:.1f})."
                + floor)
    if better and not worse:
        return (f"**The claim does not hold here.** At {len(better)} of {len(rows)} matched levels ({span}) students of "
                "antidistillation traces are *better* than students of temperature traces (95% CIs above zero).")
    if worse and better:
        return (f"**Mixed.** Antidistillation students are worse at {len(worse)} levels and better at {len(better)} "
                f"levels of {len(rows)} ({span}).")
    mean = np.mean([r["diff"] for r in rows])
    return (f"**Not shown.** At every matched level ({span}) the 95% CI of the student-accuracy difference "
            f"(antidistillation − temperature) includes zero; the mean difference is {100 * mean:.1f} points. "
            "More seeds or test problems would be needed to resolve it." + floor)


def _nll_sentence(nll_table: list[dict]) -> str:
    rows = [r for r in nll_table if "diff" in r]
    if not rows:
        return ""
    up = [r for r in rows if r["diff_ci_low"] > 0]
    down = [r for r in rows if r["diff_ci_high"] < 0]
    mean = np.mean([r["diff"] for r in rows])
    return (f"Student loss on ground-truth test solutions: antidistillation minus temperature is {mean:+.3f} nats per "
            f"token on average over the matched levels; significantly higher at {len(up)} and lower at {len(down)} "
            f"of {len(rows)} levels (95% bootstrap CIs).")


def plot_tradeoff(df, path) -> None:
    grid = np.linspace(df.teacher_acc.min(), df.teacher_acc.max(), 60)
    curves = _curves(df, ["temperature", "antidistill", "permutation"], grid)
    with png_figure(path, figsize=(6, 4.5)) as (_fig, ax):
        for m, sub in df.groupby("method"):
            ax.scatter(sub.teacher_acc, sub.student_acc, s=18, alpha=0.6, color=COLORS.get(m), label=f"{m} (runs)")
        for m, c in curves.items():
            ok = np.isfinite(c).sum(0) >= max(10, c.shape[0] // 4)  # grid points the fits cover
            finite = np.where(np.isfinite(c), c, np.nan)[:, ok]
            mean, lo, hi = (np.full(grid.shape, np.nan) for _ in range(3))
            if ok.any():
                mean[ok] = np.nanmean(finite, 0)
                lo[ok], hi[ok] = np.nanpercentile(finite, [2.5, 97.5], 0)
            ax.plot(grid, mean, color=COLORS[m], lw=2, label=f"{m} (LOWESS mean)")
            ax.fill_between(grid, lo, hi, color=COLORS[m], alpha=0.15)
        ax.set_xlabel("teacher accuracy (test)")
        ax.set_ylabel("student accuracy (test)")
        ax.set_title("Teacher vs distilled-student accuracy")
        ax.legend(fontsize=7)


def plot_loss_dynamics(histories: dict[str, list[list[dict]]], path) -> None:
    """Mean student train loss and clean-holdout loss over steps, per method (paper Fig. 5)."""
    with png_figure(path, ncols=2, figsize=(9, 3.8)) as (_fig, axes):
        for m, hs in histories.items():
            for ax, key in zip(axes, ("loss", "eval_loss")):
                by_step: dict[int, list[float]] = {}
                for h in hs:
                    for e in h:
                        if key in e:
                            by_step.setdefault(e["step"], []).append(e[key])
                if by_step:
                    steps = sorted(by_step)
                    ax.plot(steps, [np.mean(by_step[s]) for s in steps], color=COLORS.get(m), label=m)
        axes[0].set_title("student train loss")
        axes[1].set_title("student loss on clean holdout traces")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=7)


def _fmt(v, pct=True):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _matched_lines(table: list[dict], pct: bool) -> list[str]:
    """A matched-teacher-accuracy table as markdown (``pct``: values are accuracies shown in %)."""
    out = ["| teacher acc | antidistill | temperature | permutation | diff | 95% CI |", "|---|---|---|---|---|---|"]
    for r in table:
        ci = f"[{_fmt(r.get('diff_ci_low'), pct)}, {_fmt(r.get('diff_ci_high'), pct)}]" if "diff" in r else "–"
        out.append(f"| {_fmt(r['teacher_acc'])} | {_fmt(r['antidistill'], pct)} | {_fmt(r['temperature'], pct)} | "
                   f"{_fmt(r['permutation'], pct)} | {_fmt(r.get('diff'), pct)} | {ci} |")
    return out


def write_report(run_dir: str | Path) -> Path:
    """Plots and ``report.md``, built from the run directory alone (``antidistill report RUN_DIR``).

    Reads ``config.yaml``, ``results.parquet``, each point's ``history.json``, ``fd_check.json`` and
    (toy runs) ``world.json``; computes nothing that a sweep stage produces.
    """
    files = RunDir(run_dir)
    if not files.results.is_file():
        raise ValueError(f"{files.results} does not exist: run the sweep first (antidistill sweep)")
    cfg = yaml.safe_load(files.config.read_text())
    df = pd.read_parquet(files.results)
    plot_tradeoff(df, files.tradeoff_plot)
    histories: dict[str, list] = {}
    for r in df.itertuples():
        h = files.point(r.method, r.param, r.seed).history
        if h.is_file():
            histories.setdefault(r.method, []).append(json.loads(h.read_text()))
    plot_loss_dynamics(histories, files.loss_plot)
    table = matched_table(df)
    nll_table = matched_table(df, y="student_test_nll")
    summary = (df.groupby(["method", "param"])
                 .agg(teacher_acc=("teacher_acc", "mean"), teacher_sd=("teacher_acc", "std"),
                      student_acc=("student_acc", "mean"), student_sd=("student_acc", "std"),
                      student_nll=("student_test_nll", "mean"), seeds=("seed", "count"))
                 .reset_index())
    lines = [f"# antidistill report: `{cfg['name']}`", "", "## Verdict", "",
             verdict(table, float(df.student_acc.max())), "", _nll_sentence(nll_table), ""]
    if files.world.is_file():
        wm = json.loads(files.world.read_text())
        lines += ["## Toy world", "",
                  f"- teacher (Llama, {wm.get('teacher_params', 0):,} params): greedy test accuracy "
                  f"{_fmt(wm.get('teacher_test_accuracy'))}%",
                  f"- proxy (Qwen2, {wm.get('proxy_params', 0):,} params), pretrained on generic toy text only",
                  f"- student (GPT-2, {wm.get('student_params', 0):,} params), pretrained on generic toy text; "
                  f"3-shot test accuracy before distillation {_fmt(wm.get('student_base_fewshot_accuracy'))}%", ""]
    lines += ["## Matched teacher accuracy", "",
              "Student accuracy (%) from the bootstrapped LOWESS fits at the same teacher accuracy; "
              "diff = antidistillation − temperature, 95% bootstrap CI.", ""]
    lines += _matched_lines(table, pct=True)
    lines += ["", "Student NLL per token on the *ground-truth* test solutions at matched teacher accuracy "
              "(higher = the student learned the task worse; diff = antidistillation − temperature):", ""]
    lines += _matched_lines(nll_table, pct=False)
    lines += ["", "## Results (mean over seeds)", "",
              "| method | param | teacher acc % (sd) | student acc % (sd) | student NLL on test solutions | seeds |",
              "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.method} | {r.param:g} | {_fmt(r.teacher_acc)} ({_fmt(r.teacher_sd)}) | "
                     f"{_fmt(r.student_acc)} ({_fmt(r.student_sd)}) | {_fmt(r.student_nll, False)} | {r.seeds} |")
    lines += ["", f"Test problems per evaluation: {int(df.n_test.iloc[0])}. Every run is in `results.parquet`.", "",
              "## Plots", "", "![trade-off](tradeoff.png)", "", "![loss dynamics](loss_dynamics.png)", ""]
    if files.fd_check.is_file():
        lines += _fd_section(json.loads(files.fd_check.read_text()), cfg["sampling"])
    lines += ["## Settings", "", "```yaml", files.config.read_text().rstrip(), "```", ""]
    return write_text_atomic(files.report, "\n".join(lines))


def _fd_section(info: dict, sampling: dict) -> list[str]:
    """The finite-difference check (the sweep's ``fd_check`` stage) at the run's ε and difference."""
    jvp = [r for r in info["rows"] if r["difference"] == "jvp"]
    at = [r for r in info["rows"] if r["difference"] == sampling["difference"] and r["dtype"] == "float32"
          and abs(r["eps"] - sampling["eps"]) < 1e-15]
    out = ["## Finite-difference check", "", "![fd error](fd_error.png)", "",
           f"Best ε: {info['best_eps_float32']:g} (float32), {info['best_eps_bfloat16']:g} (bfloat16)."]
    if at:
        out.append(f"At the run's ε = {sampling['eps']:g} ({sampling['difference']}, float32) the mean sine error is "
                   f"{at[0]['mean_sine_error']:.2e}.")
    if jvp:
        out.append(f"JVP vs autograd: mean sine error {jvp[0]['mean_sine_error']:.2e}.")
    return out + [""]
