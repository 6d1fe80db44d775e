"""The report's figures: the forest plot of arm effects, the teacher–student trade-off, the loss dynamics.

Trade-off curves are the mean and 95% band of bootstrapped LOWESS fits (statsmodels), as in the
paper's appendix B.2: each draw resamples an arm's (teacher accuracy, student accuracy) points with
replacement and fits LOWESS on a common grid. A band is drawn only where the arm's own points cover
the grid: at least ``MIN_LEVELS`` distinct teacher-accuracy levels (accuracies ``LEVEL_WIDTH`` apart
count as one level: the seeds of one design point scatter by about a point), in the arm's data and
in each bootstrap draw, and only at grid points that at least half of the draws reach (a draw
covers its resample's range only) and that lie within ``MAX_GAP`` of one of the arm's points: no
band is drawn across a gap in the data. A local fit over one or two tight clusters of points has an
unbounded slope; these rules keep such fits off the plot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from statsmodels.nonparametric.smoothers_lowess import lowess

from .arms import COLORS, ORDER
from .plotting import png_figure

N_BOOT = 300
LOWESS_FRAC = 0.8
MIN_LEVELS = 4  # distinct teacher-accuracy levels an arm (and each bootstrap draw) needs for a band
LEVEL_WIDTH = 0.02  # teacher accuracies closer than this are one level
MAX_GAP = 0.03  # no band at a grid point farther than this from every one of the arm's teacher accuracies
# runs an arm needs for a 95% band: with fewer, resamples of a handful of points make local fits that swing
# from 0 to 1 between them, which reads as information; the arm's LOWESS line is drawn alone
MIN_RUNS_FOR_BAND = 12


def n_levels(x: np.ndarray, width: float = LEVEL_WIDTH) -> int:
    """How many levels ``x`` has: from the smallest value up, each level holds the values within
    ``width`` of its first one (a tight cluster is one level; spread-out values are many)."""
    n, start = 0, -np.inf
    for v in np.sort(np.asarray(x, float)):
        if v > start + width:
            n, start = n + 1, v
    return n


def bootstrap_lowess(x: np.ndarray, y: np.ndarray, grid: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0,
                     frac: float = LOWESS_FRAC, clip: tuple[float, float] | None = (0.0, 1.0),
                     min_levels: int = MIN_LEVELS) -> np.ndarray:
    """``(n_boot, len(grid))`` LOWESS fits of y on x over bootstrap resamples; NaN outside each draw's
    x-range and for draws with fewer than ``min_levels`` levels of x (:func:`n_levels`)."""
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, len(grid)), np.nan)
    n = len(x)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        xb, yb = x[idx], y[idx]
        if n_levels(xb) < min_levels:
            continue
        fit = lowess(yb, xb, frac=frac, it=0, xvals=grid)
        fit[(grid < xb.min()) | (grid > xb.max())] = np.nan
        out[b] = np.clip(fit, *clip) if clip else fit
    return out


def lowess_line(x, y, grid, *, frac: float = LOWESS_FRAC) -> np.ndarray | None:
    """The LOWESS fit of y on x at ``grid`` (NaN outside x's range and farther than ``MAX_GAP`` from every x);
    None when ``x`` has fewer than ``MIN_LEVELS`` levels."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if n_levels(x) < MIN_LEVELS:
        return None
    fit = np.clip(lowess(y, x, frac=frac, it=0, xvals=grid), 0.0, 1.0)
    near = np.abs(grid[:, None] - x[None, :]).min(1) <= MAX_GAP
    fit[(grid < x.min()) | (grid > x.max()) | ~near] = np.nan
    return fit


def lowess_band(x, y, grid, *, seed: int = 0, n_boot: int = N_BOOT,
                clip: tuple[float, float] | None = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and 2.5/97.5 percentiles of the bootstrap fits on ``grid`` (NaN where fewer than half the
    draws reach a grid point, or farther than ``MAX_GAP`` from every x); None when ``x`` has fewer than
    ``MIN_LEVELS`` levels or fewer than ``MIN_RUNS_FOR_BAND`` values."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if n_levels(x) < MIN_LEVELS or len(x) < MIN_RUNS_FOR_BAND:
        return None
    fits = bootstrap_lowess(x, y, grid, n_boot=n_boot, seed=seed, clip=clip)
    near = np.abs(grid[:, None] - x[None, :]).min(1) <= MAX_GAP
    ok = (np.isfinite(fits).sum(0) >= n_boot / 2) & near
    mean, lo, hi = (np.full(grid.shape, np.nan) for _ in range(3))
    if not ok.any():
        return None
    mean[ok] = np.nanmean(fits[:, ok], 0)
    lo[ok], hi[ok] = np.nanpercentile(fits[:, ok], [2.5, 97.5], 0)
    return mean, lo, hi


def plot_tradeoff(df: pd.DataFrame, path, *, n_boot: int | None = None) -> None:
    """Teacher vs student accuracy: every run as a dot, each arm's LOWESS band where it covers a range;
    one legend entry per arm, outside the data. ``n_boot``: bootstrap draws (default ``N_BOOT``)."""
    n_boot = n_boot or N_BOOT
    grid = np.linspace(df.teacher_acc.min(), df.teacher_acc.max(), 80)
    arms = [m for m in ("greedy", *ORDER) if (df.method == m).any()]
    with png_figure(path, figsize=(7.5, 4.5)) as (_fig, ax):
        handles = []
        for i, m in enumerate(arms):
            sub = df[df.method == m]
            color = COLORS.get(m, "tab:brown")
            dots = (dict(marker="x", s=16, alpha=0.8, linewidths=1, zorder=3) if m == "greedy"
                    else dict(marker="o", s=12, alpha=0.45, linewidths=0, zorder=2))
            ax.scatter(sub.teacher_acc, sub.student_acc, color=color, **dots)
            band = None if m == "greedy" else lowess_band(sub.teacher_acc, sub.student_acc, grid, seed=i, n_boot=n_boot)
            line = band[0] if band is not None else (
                None if m == "greedy" else lowess_line(sub.teacher_acc, sub.student_acc, grid))
            if line is not None:
                ax.plot(grid, line, color=color, lw=2)
            if band is not None:
                ax.fill_between(grid, band[1], band[2], color=color, alpha=0.15, linewidth=0)
            note = "" if band is not None or line is None else ", no band"
            handles.append(Line2D([], [], color=color, marker="x" if m == "greedy" else "o", markersize=5,
                                  lw=2 if line is not None else 0, label=f"{m} ({len(sub)} runs{note})"))
        ax.set_xlabel("teacher accuracy (delivered traces)")
        ax.set_ylabel("student accuracy (test)")
        worlds = df["world"].nunique() if "world" in df.columns else 1
        ax.set_title(f"Teacher vs distilled-student accuracy ({worlds} world build{'s' * (worlds != 1)})", fontsize=10)
        ax.grid(alpha=0.3)
        lines = any(h.get_linewidth() > 0 for h in handles)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                  title=f"arm (line: LOWESS mean; 95% band\nfrom {MIN_RUNS_FOR_BAND} runs)" if lines
                  else "arm (too few runs\nfor a fitted line)",
                  title_fontsize=7)


def _target_label(t: float | None) -> str:
    return "all targets" if t is None else f"{t:+g} pts"


def plot_forest(rows: list[dict], world_labels: dict[str, str], path, *, unit: str = "points",
                scale: float = 100.0) -> None:
    """Each contrast's effect per world (dots) and pooled (black diamond, 95% interval), per target.

    ``rows``: dicts with ``label`` (the contrast), ``target`` (points or None for all targets) and ``e``
    (a :func:`~antidistill.experiment.inference.pooled_effect` result, its ``worlds`` the per-world
    effects). ``world_labels``: world id → its short label in the report's worlds table.
    """
    panels: dict[str, list[dict]] = {}
    for r in rows:
        if r["e"] is not None:
            panels.setdefault(r["label"], []).append(r)
    if not panels:
        panels = {"no contrast could be estimated": []}
    n_rows = [max(len(v), 1) for v in panels.values()]
    colored = len(world_labels) <= 20
    palette = [f"C{i}" for i in range(10)] + [f"tab:{c}" for c in ("brown", "pink", "olive", "cyan")]
    markers = "o^sDv<>ph*"
    style = {w: (palette[i % len(palette)] if colored else "0.5", markers[(i // 10) % len(markers)] if colored else "o")
             for i, w in enumerate(world_labels)}
    with png_figure(path, figsize=(8.0, 0.9 + sum(0.42 * n + 0.55 for n in n_rows)), nrows=len(panels), sharex=True,
                    squeeze=False, gridspec_kw={"height_ratios": n_rows}, rect=(0, 0, 0.80, 0.97)) as (fig, axes):
        rng = np.random.default_rng(0)
        for ax, (label, rs) in zip(axes[:, 0], panels.items()):
            claims = set()
            dots: dict[str, list[tuple[float, float]]] = {}  # world → its (effect, row) points: one scatter each
            for j, r in enumerate(rs):
                for w, d in r["e"]["worlds"].items():
                    dots.setdefault(w, []).append((scale * d, -j + rng.uniform(-0.22, 0.22)))
            for w, pts in dots.items():
                c, mk = style.get(w, ("0.5", "o"))
                ax.scatter(*zip(*pts), s=14, color=c, marker=mk, alpha=0.75, linewidths=0, zorder=2)
            for j, r in enumerate(rs):
                e, y = r["e"], -j
                claims.add(e["claim"])
                ax.errorbar(scale * e["estimate"], y, xerr=[[scale * (e["estimate"] - e["ci_low"])],
                                                           [scale * (e["ci_high"] - e["estimate"])]],
                            fmt="D", color="k", markersize=6, capsize=3, lw=1.5, zorder=3)
            ax.axvline(0, color="0.3", lw=0.8, ls="--", zorder=1)
            if not rs:
                ax.set_yticks([])
                ax.text(0.5, 0.5, "no arm has temperature runs to compare with", transform=ax.transAxes,
                        ha="center", va="center")
                continue
            ax.set_yticks([-j for j in range(len(rs))], [f"{_target_label(r['target'])} ({r['e']['n_worlds']}w)"
                                                         for r in rs], fontsize=8)
            ax.set_ylim(-len(rs) + 0.5, 0.5)
            ax.set_title(f"{label}" + (f"  [{', '.join(sorted(claims))}]" if claims else ""), fontsize=9, loc="left")
            ax.grid(axis="x", alpha=0.3)
        axes[-1, 0].set_xlabel(f"effect ({unit}); negative: students learn less from the first arm's traces")
        pooled = "mean over\nworld builds" if len(world_labels) > 1 else "this world\nbuild's estimate"
        handles = [Line2D([], [], ls="", marker="D", color="k", label=f"{pooled},\n95% CI")]
        if colored:
            handles += [Line2D([], [], ls="", marker=style[w][1], color=style[w][0], label=lab)
                        for w, lab in world_labels.items()]
        else:
            handles.append(Line2D([], [], ls="", marker="o", color="0.5", label=f"one world build ({len(world_labels)})"))
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.81, 0.97), fontsize=7, frameon=False)
        fig.suptitle("Arm effects per world build and target (dots) and over world builds (diamonds)", fontsize=10)


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
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
