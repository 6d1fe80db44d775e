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
from .arms import COLORS, ORDER
from .inference import ladder_effects, ladder_reading, pooled_effect, verdict_sentence
from .plotting import png_figure
from .rundir import RunDir

N_BOOT = 300
LOWESS_FRAC = 0.8


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


def common_range(df, methods=ORDER) -> tuple[float, float] | None:
    """The teacher accuracies that *every* method present covers (None if they do not overlap)."""
    present = [m for m in methods if (df.method == m).any()]
    if len(present) < 2:
        return None
    lo = max(df[df.method == m].teacher_acc.min() for m in present)
    hi = min(df[df.method == m].teacher_acc.max() for m in present)
    return (lo, hi) if hi >= lo else None


def matched_table(df, levels: np.ndarray | None = None, y: str = "student_acc") -> list[dict]:
    """Descriptive: ``y`` per method at matched teacher accuracy, antidistillation − temperature with a
    95% bootstrap band of the LOWESS fits.

    The levels span only the teacher accuracies that every method covers (no extrapolation past any
    curve). The verdict does not come from this table but from the pooled model (``inference``).
    """
    present = [m for m in ORDER if (df.method == m).any()]
    if "antidistill" not in present or "temperature" not in present:
        return []
    if levels is None:
        rng = common_range(df)
        if rng is None:
            return []
        lo, hi = rng
        levels = np.linspace(lo, hi, 5) if hi > lo else np.array([lo])
    curves = _curves(df, present, levels, y)
    rows = []
    for j, level in enumerate(levels):
        row = {"teacher_acc": float(level)}
        for m in present:
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


def _nll_sentence(effect: dict | None) -> str:
    if effect is None:
        return ""
    e = effect
    sig = "significantly " + ("higher" if e["ci_low"] > 0 else "lower") if e["significant"] else "not significantly different"
    return (f"Student loss on ground-truth test solutions (pooled model, same design): antidistillation − temperature "
            f"= {e['estimate']:+.3f} nats per token (95% CI {e['ci_low']:+.3f} to {e['ci_high']:+.3f}), {sig}.")


def plot_tradeoff(df, path) -> None:
    grid = np.linspace(df.teacher_acc.min(), df.teacher_acc.max(), 60)
    curves = _curves(df, [m for m in ORDER if (df.method == m).any()], grid)
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
    if not table:
        return ["(the methods' teacher accuracies do not overlap)"]
    methods = [m for m in ORDER if m in table[0]]
    out = ["| teacher acc | " + " | ".join(methods) + " | AD − temp | 95% band |",
           "|---" * (len(methods) + 3) + "|"]
    for r in table:
        ci = f"[{_fmt(r.get('diff_ci_low'), pct)}, {_fmt(r.get('diff_ci_high'), pct)}]" if "diff" in r else "–"
        out.append(f"| {_fmt(r['teacher_acc'])} | " + " | ".join(_fmt(r[m], pct) for m in methods)
                   + f" | {_fmt(r.get('diff'), pct)} | {ci} |")
    return out


LADDER = [("temperature", "1. temperature (reference)"), ("antidistill", "2. antidistillation, cross-family proxy"),
          ("whitebox", "3. white-box antidistillation (proxy = base student)"),
          ("whitebox_permutation", "4. permuted white-box Δ̂"), ("permutation", "permuted cross-family Δ̂ (appendix A)"),
          ("reasoning_only", "antidistillation on the reasoning only (cross-family proxy)")]


def _effect_cells(e: dict | None, scale: float = 100.0, fmt: str = "{:+.1f}") -> str:
    if e is None:
        return "– | – | –"
    return (f"{fmt.format(scale * e['estimate'])} | [{fmt.format(scale * e['ci_low'])}, "
            f"{fmt.format(scale * e['ci_high'])}] | {e['n_runs']}")


def _ladder_lines(df, effects: dict) -> list[str]:
    out = ["## Transfer ladder", "",
           "Each arm against temperature at matched teacher accuracy (pooled model over the arm's runs inside "
           "temperature's teacher-accuracy range and all temperature runs; 95% CI; see `antidistill.experiment.inference`). Negative = students learn "
           "less from that arm's traces.", "",
           "| arm | student acc − temperature (points) | 95% CI | runs |", "|---|---|---|---|"]
    for m, label in LADDER:
        if m == "temperature":
            if (df.method == m).any():
                out.append(f"| {label} | 0 | – | {int((df.method == m).sum())} |")
            continue
        if (df.method == m).any():
            out.append(f"| {label} | {_effect_cells(effects.get(m))} |")
    if "whitebox_vs_permutation" in effects:
        out.append(f"| white-box − its permutation (both against temperature's curve) | "
                   f"{_effect_cells(effects['whitebox_vs_permutation'])} |")
    out += ["", "Reading: " + ladder_reading(effects), "",
            "(If white-box is worse than both its permutation and temperature while the cross-family proxy is not, "
            "the mechanism works but does not transfer here; if white-box, its permutation and temperature are all "
            "alike, the mechanism does not work in this world; if white-box and its permutation are alike and both "
            "worse than temperature, the damage is noise.)", ""]
    return out


def _nll_class_lines(df) -> list[str]:
    cols = [c for c in ("student_nll_result", "student_nll_reasoning", "student_nll_final") if c in df.columns]
    if not cols:
        return []
    out = ["## Student NLL by token class", "",
           "Mean NLL per token of the distilled students on the ground-truth test solutions, by token class: "
           "arithmetic results (the number after `=`), other reasoning tokens, and the final-answer block. "
           "Rows: mean over runs; last row: antidistillation − temperature from the pooled model (95% CI).", "",
           "| method | results | reasoning | final block |", "|---|---|---|---|"]
    means = df.groupby("method")[cols].mean()
    for m in [m for m in ORDER if m in means.index]:
        out.append(f"| {m} | " + " | ".join(f"{means.loc[m, c]:.3f}" for c in cols) + " |")
    cells = []
    for c in cols:
        e = pooled_effect(df, "antidistill", y=c)
        cells.append("–" if e is None else f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]")
    out += ["| AD − temperature | " + " | ".join(cells) + " |", ""]
    return out


def write_report(run_dir: str | Path, pool: tuple[str | Path, ...] = ()) -> Path:
    """Plots and ``report.md``, built from the run directory alone (``antidistill report RUN_DIR``).

    Reads ``config.yaml``, ``results.parquet``, each point's ``history.json``, ``fd_check.json`` and
    (toy runs) ``world.json``; computes nothing that a sweep stage produces. ``pool``: further run
    directories (the same design on other world builds, e.g. ``--set world.seed=1``) whose runs join
    the pooled estimates and tables as more (world, seed) clusters; the report is written in ``run_dir``.
    """
    files = RunDir(run_dir)
    for d in (run_dir, *pool):
        if not RunDir(d).results.is_file():
            raise ValueError(f"{RunDir(d).results} does not exist: run the sweep first (antidistill sweep)")
    cfg = yaml.safe_load(files.config.read_text())
    df = pd.concat([pd.read_parquet(RunDir(d).results) for d in (run_dir, *pool)], ignore_index=True)
    plot_tradeoff(df, files.tradeoff_plot)
    histories: dict[str, list] = {}
    for r in df.itertuples():
        pd_ = files.point(r.method, r.param, r.seed)  # the loss plot: this run directory's students
        h = pd_.history if pd_.history.is_file() else pd_.root / "history.json"  # older runs kept it beside the folder
        if h.is_file():
            histories.setdefault(r.method, []).append(json.loads(h.read_text()))
    plot_loss_dynamics(histories, files.loss_plot)
    table = matched_table(df)
    nll_table = matched_table(df, y="student_test_nll")
    primary = pooled_effect(df, "antidistill")
    effects = ladder_effects(df)
    summary = (df.groupby(["method", "param"])
                 .agg(teacher_acc=("teacher_acc", "mean"), teacher_sd=("teacher_acc", "std"),
                      student_acc=("student_acc", "mean"), student_sd=("student_acc", "std"),
                      student_nll=("student_test_nll", "mean"), seeds=("seed", "count"))
                 .reset_index())
    lines = [f"# antidistill report: `{cfg['name']}`", "", "## Verdict", "",
             verdict_sentence(primary, float(df.student_acc.max())), "",
             _nll_sentence(pooled_effect(df, "antidistill", y="student_test_nll")), "",
             "Teacher accuracy is scored on the *delivered* traces: the stored completion is exactly what the "
             "student trains on, judged on its own final answer (a trace with no answer gets a sampled one).", ""]
    if files.world.is_file():
        wm = json.loads(files.world.read_text())
        lines += ["## Toy world", "",
                  f"- teacher (Llama, {wm.get('teacher_params', 0):,} params): greedy test accuracy "
                  f"{_fmt(wm.get('teacher_test_accuracy'))}%",
                  f"- proxy (Qwen2, {wm.get('proxy_params', 0):,} params), pretrained on generic toy text only",
                  f"- student (GPT-2, {wm.get('student_params', 0):,} params), pretrained on generic toy text; "
                  f"3-shot test accuracy before distillation {_fmt(wm.get('student_base_fewshot_accuracy'))}%", ""]
    lines += _ladder_lines(df, effects)
    lines += ["## Matched teacher accuracy", "",
              "Descriptive: student accuracy (%) from the bootstrapped LOWESS fits at the same teacher accuracy, "
              "at levels inside the range every method covers; AD − temp with the 95% band of the fits. The "
              "verdict comes from the pooled model above, not from these levels.", ""]
    lines += _matched_lines(table, pct=True)
    lines += ["", "Student NLL per token on the *ground-truth* test solutions at matched teacher accuracy "
              "(higher = the student learned the task worse; diff = antidistillation − temperature):", ""]
    lines += _matched_lines(nll_table, pct=False)
    lines += [""] + _nll_class_lines(df)
    lines += ["", "## Results (mean over seeds)", "",
              "| method | param | teacher acc % (sd) | student acc % (sd) | student NLL on test solutions | seeds |",
              "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.method} | {r.param:g} | {_fmt(r.teacher_acc)} ({_fmt(r.teacher_sd)}) | "
                     f"{_fmt(r.student_acc)} ({_fmt(r.student_sd)}) | {_fmt(r.student_nll, False)} | {r.seeds} |")
    lines += ["", f"Test problems per evaluation: {int(df.n_test.iloc[0])}. Every run is in `results.parquet`.", "",
              "## Plots", "", "![trade-off](tradeoff.png)", "", "![loss dynamics](loss_dynamics.png)", ""]
    if files.calibration.is_file():
        lines += _calibration_section(json.loads(files.calibration.read_text()))
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


def _calibration_section(info: dict) -> list[str]:
    """The holdout-only calibration (a ``grid: calibrated`` run's first stage): each arm's measured curve
    and the values chosen for its target teacher accuracies."""
    out = ["## Calibration (holdout only)", "",
           f"Teacher accuracy on {info['n_holdout']} holdout problems ({info['scoring']} scoring) over each arm's "
           "grid; each target's τ or λ is read off the curve by linear interpolation. No student is involved.", "",
           "| arm | measured: param → teacher acc % | chosen: target → param |", "|---|---|---|"]
    for arm, ms in info["measured"].items():
        curve = ", ".join(f"{m['param']:g} → {_fmt(m['teacher_acc'])}" for m in ms)
        picks = ", ".join(f"{c['target']:.2f} → {c['param']:g}" + ("" if c["inside_measured_range"] else " (outside)")
                          for c in info["chosen"].get(arm, []))
        out.append(f"| {arm} | {curve} | {picks} |")
    return out + [""]
