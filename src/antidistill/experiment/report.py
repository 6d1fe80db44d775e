"""``report.md`` and its plots, from any results source: run directories, compact world directories,
or folders of them, pooled over world builds (``antidistill report PATH --pool PATH``).

Every estimate comes from :mod:`antidistill.experiment.inference` (world-level effects, t(K−1) over
K world builds); this module only lays them out, with each world's gate, calibration and
finite-difference check, and says what kind of claim each interval makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io_utils import write_text_atomic
from .arms import ORDER
from .distiller_table import distiller_table, distiller_table_lines
from .figures import plot_forest, plot_loss_dynamics, plot_tradeoff
from .gate import world_gate
from .inference import (
    NEXT_WORLD,
    PRIMARY_TARGET,
    claim_note,
    ladder_effects,
    ladder_reading,
    pooled_effect,
    primary_effect,
    run_effects,
    slope_worlds,
    targets_of,
    verdict_sentence,
)
from .report_provenance import calibration_lines, fd_lines, pct_text, settings_lines
from .results_io import Source, load_sources, own_seed_rows, pooled_results
from .rundir import RunDir
from .transfer import default_rows, naive_rows
from .transfer_report import ensemble_lines, has_transfer_design, headline_lines, transfer_lines

# the contrasts the report prints, in order: (key, label, arm, other)
CONTRASTS = [("antidistill", "antidistillation (cross-family proxy) − temperature", "antidistill", None),
             ("permutation", "permuted cross-family Δ̂ − temperature", "permutation", None),
             ("reasoning_only", "antidistillation on the reasoning only − temperature", "reasoning_only", None),
             ("whitebox", "white-box antidistillation − temperature", "whitebox", None),
             ("whitebox_permutation", "permuted white-box Δ̂ − temperature", "whitebox_permutation", None),
             ("whitebox_vs_permutation", "white-box − its permutation", "whitebox", "whitebox_permutation"),
             ("proxy_mix", "proxy-logit mixing (cross-family proxy, no g) − temperature", "proxy_mix", None),
             ("random_direction", "norm-matched random direction in g's place − temperature", "random_direction", None),
             ("antidistill_vs_random", "antidistillation − its norm-matched random direction", "antidistill",
              "random_direction")]
def _target_cell(t: float | None) -> str:
    return "pooled over targets" if t is None else f"{t:+g}"


def effect_rows(df: pd.DataFrame, y: str = "student_acc") -> list[dict]:
    """Every printed contrast at each target of the design and pooled over targets (``e`` None where no
    world has a comparable pair): dicts with ``key``, ``label``, ``target`` and ``e``."""
    runs = run_effects(df, y=y)
    present = set(df.method)
    rows = []
    for key, label, arm, other in CONTRASTS:
        if arm not in present or (other is not None and other not in present):
            continue
        for t in [*targets_of(df), None]:
            rows.append({"key": key, "label": label, "target": t,
                         "e": pooled_effect(df, arm, y=y, target=t, other=other, runs=runs)})
    return rows


def _claim_cell(e: dict) -> str:
    if e["claim"] == NEXT_WORLD:
        return f"next world build (t({e['n_worlds'] - 1}))"
    return "this world build only" + (" (one run: test-set sampling only)" if e.get("test_sampling_only") else "")


def interval_text(e: dict, fmt: str, scale: float = 1.0) -> str:
    """``[lo, hi]`` in ``fmt``, or why there is none (one run of an outcome without a known sampling variance)."""
    if not (np.isfinite(e["ci_low"]) and np.isfinite(e["ci_high"])):
        return "no interval (one run)"
    return f"[{fmt.format(scale * e['ci_low'])}, {fmt.format(scale * e['ci_high'])}]"


def _effect_table(rows: list[dict], scale: float, digits: int, unit: str) -> list[str]:
    if not rows:
        return ["(no defended arm was run: only the baselines)"]
    out = [f"| contrast | target (points) | estimate ({unit}) | 95% CI | worlds | runs | claim |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["e"]
        if e is None:
            out.append(f"| {r['label']} | {_target_cell(r['target'])} | – | – | 0 | 0 | no comparable runs |")
            continue
        f = f"{{:+.{digits}f}}"
        out.append(f"| {r['label']} | {_target_cell(r['target'])} | {f.format(scale * e['estimate'])} | "
                   f"{interval_text(e, f, scale)} | {e['n_worlds']} | {e['n_runs']} | {_claim_cell(e)} |")
    return out


def world_table(sources: list[Source], df: pd.DataFrame) -> list[dict]:
    """One row per world build: its label (``w<seed>`` as ``demo --full`` names exported worlds, where every
    source holds one world of a distinct seed, else ``W<i>``), source, seed, calibration and gate.

    A source's metadata files describe its world when it holds one world; a gate missing from its
    files is computed from the world's rows (``world_gate``), as the sweep computes it."""
    rows = []
    for s in sources:
        one = len(s.worlds) == 1
        cfg = s.config
        for w in s.worlds:
            cal = s.calibration if one else None
            gate, gate_source = (s.gate, "gate.json") if one and s.gate else (world_gate(df[df.world == w]), "rows")
            rows.append({"world": w, "source": str(s.root), "seed": (cfg.get("world") or {}).get("seed") if one else None,
                         "best": (cal or {}).get("best_undefended"), "base_tau": (cal or {}).get("base_tau"),
                         "gate": gate, "gate_source": gate_source, "label": ""})
    by_seed = None not in (seeds := [r["seed"] for r in rows]) and len(set(seeds)) == len(seeds)
    for i, r in enumerate(rows, 1):
        r["label"] = f"w{r['seed']}" if by_seed else f"W{i}"
    return rows


def _worlds_lines(worlds: list[dict]) -> list[str]:
    g0 = worlds[0]["gate"]
    out = ["## Worlds", "",
           "One row per world build (the unit of replication). Best undefended: greedy teacher accuracy on the "
           "holdout (delivered scoring) from the world's calibration; base τ: where the λ arms sample. Gate: a "
           f"student distilled on greedy traces reaches {100 * g0['min_greedy_student']:g}% test accuracy, and under "
           "temperature sampling student accuracy rises with teacher accuracy by at least "
           f"{g0['min_slope']:g} student points per teacher point (OLS over the world's temperature runs).",
           "", "| | world | seed | best undefended % | base τ | greedy-trace student % | temperature slope [95% CI] "
           "| gate |", "|---|---|---|---|---|---|---|---|"]
    failing, unchecked, imprecise = [], [], []
    for r in worlds:
        g = r["gate"]
        lo, hi = g.get("slope_ci", [float("nan")] * 2)
        slope = "–" if not np.isfinite(g["temperature_slope"]) else f"{g['temperature_slope']:.2f}" + (
            f" [{lo:.2f}, {hi:.2f}]" if np.isfinite([lo, hi]).all() else "")
        if not np.isfinite(g["greedy_student_acc"]):  # an older design: no greedy runs to gate on
            verdict = "not checked: no greedy runs" + ("" if g["slope_ok"] else f"; slope below {g['min_slope']:g}")
            unchecked.append(r["label"])
        elif g["passes"]:
            verdict = "passes"
        else:
            verdict = f"**fails**: {g['reason']}"
            failing.append(f"{r['label']} ({g['reason']})")
            if not g["slope_ok"] and np.isfinite(hi) and hi >= g["min_slope"]:
                imprecise.append(r["label"])
        if r["gate_source"] != "gate.json":
            verdict += " (from its rows; no gate.json)"
        seed = "–" if r["seed"] is None else r["seed"]
        base = "–" if r["base_tau"] is None else f"{r['base_tau']:g}"
        out.append(f"| {r['label']} | `{r['world']}` | {seed} | {pct_text(r['best'])} | {base} | "
                   f"{pct_text(g['greedy_student_acc'])} | {slope} | {verdict} |")
    out.append("")
    if failing:
        out.append(f"**{len(failing)} of {len(worlds)} world builds fail the gate:** " + "; ".join(failing)
                   + ". By the gate's reading, their students learn too little from the teacher for poison to show.")
        if imprecise:
            out.append(f"The slope's 95% interval still reaches the gate's minimum in {', '.join(imprecise)}: "
                       "there the reading cannot tell such a world from the noise of its one distillation per "
                       "point, and the world is left out all the same (pre-registered).")
    if unchecked:
        out.append(f"The gate was not checked in {', '.join(unchecked)}: "
                   f"{'its' if len(unchecked) == 1 else 'their'} design has no greedy runs.")
    if not failing and not unchecked:
        out.append("The world build passes the gate." if len(worlds) == 1 else f"All {len(worlds)} world builds pass the gate.")
    return out + [""]


def _adjustment(df: pd.DataFrame, what: str = "small teacher-accuracy") -> str:
    """How a paired difference treats the teacher-accuracy mismatch left after calibration: adjusted by the
    world's temperature slope (``inference.slope_worlds``), or plain where a world has none to fit."""
    fitted = slope_worlds(df)
    if fitted.all():
        return f"adjusted by the world's temperature slope for the {what} mismatch"
    if fitted.any():
        return (f"adjusted by the world's temperature slope for the {what} mismatch where the world has one (the "
                f"worlds with one temperature run: {', '.join(fitted.index[~fitted])}, plain paired differences)")
    return (f"not adjusted for the {what} mismatch (one temperature run per world: no slope to adjust by, so "
            "each difference is the plain paired one)")


def _verdict_lines(df: pd.DataFrame) -> list[str]:
    primary = primary_effect(df)
    nll = primary_effect(df, y="student_test_nll") if "student_test_nll" in df.columns else None
    out = ["## Verdict", "", verdict_sentence(primary, float(df.student_acc.max())), ""]
    if nll is not None:
        where = "" if nll["target"] is None else f", {nll['target']:+g}-point target"
        out += [f"Secondary endpoint, student NLL per token on the ground-truth test solutions "
                f"(antidistillation − temperature{where}): {nll['estimate']:+.3f} nats "
                f"{interval_text(nll, '{:+.3f}')} ({claim_note(nll)}).", ""]
    design = (f"Primary endpoint (pre-registered): student accuracy at the {PRIMARY_TARGET:+g}-point target, "
              f"antidistillation − temperature at the same world, seed and target, {_adjustment(df)}."
              if PRIMARY_TARGET in targets_of(df) else
              "This results table has no calibrated targets (an older design): each defended run is compared with "
              "its world's temperature line at its teacher accuracy, inside temperature's range.")
    own = own_seed_rows(df)
    if len(own) < len(df):  # replicate seeds: the reading on the sweeps' own seeds, as first registered, too
        one = primary_effect(own)
        if one is not None:
            design += (" Each world's effect is the mean of its paired differences over its seeds at that target, "
                       "replicate seeds included; over the sweeps' own seeds alone, as first registered: "
                       f"{100 * one['estimate']:+.1f} {interval_text(one, '{:+.1f}', scale=100.0)} points "
                       f"({claim_note(one)}).")
    return out + [design, "",
                  "Teacher accuracy is scored on the *delivered* traces: the stored completion is exactly what the "
                  "student trains on, judged on its own final answer.", ""]


def _ladder_lines(df: pd.DataFrame) -> list[str]:
    target = PRIMARY_TARGET if PRIMARY_TARGET in targets_of(df) else None
    where = "pooled over all runs" if target is None else f"at the {target:+g}-point target"
    return ["## Transfer ladder", "", f"Read {where} from the effects above.", "",
            "Reading: " + ladder_reading(ladder_effects(df, target=target)), "",
            "(White-box worse than its permutation and than temperature while the cross-family proxy is not: the "
            "mechanism works but its transfer is not shown; white-box, its permutation and temperature alike: the "
            "mechanism is not shown to work; white-box and its permutation alike and both worse than temperature: "
            "the damage is noise.)", ""]


def _nll_class_lines(df: pd.DataFrame) -> list[str]:
    cols = [c for c in ("student_nll_result", "student_nll_reasoning", "student_nll_final") if c in df.columns]
    if not cols:
        return []
    target = PRIMARY_TARGET if PRIMARY_TARGET in targets_of(df) else None
    out = ["## Student NLL by token class", "",
           "Mean NLL per token of the distilled students on the ground-truth test solutions, by token class: "
           "arithmetic results (the number after `=`), other reasoning tokens, and the final-answer block. Rows: "
           "mean over runs; last row: antidistillation − temperature "
           + ("pooled over runs" if target is None else f"at the {target:+g}-point target") + " (95% CI).", "",
           "| method | results | reasoning | final block |", "|---|---|---|---|"]
    means = df.groupby("method")[cols].mean()
    for m in [m for m in ORDER if m in means.index]:
        out.append(f"| {m} | " + " | ".join(pct_text(means.loc[m, c], False) for c in cols) + " |")
    cells = []
    for c in cols:
        e = pooled_effect(df, "antidistill", y=c, target=target)
        cells.append("–" if e is None else f"{e['estimate']:+.3f} {interval_text(e, '{:+.3f}')}")
    return out + ["| AD − temperature | " + " | ".join(cells) + " |", ""]


def _results_lines(df: pd.DataFrame) -> list[str]:
    by = "target" if targets_of(df) else "param"
    g = df.assign(target=df.get("target", np.nan)).groupby(["method", by], dropna=False)
    summary = g.agg(teacher_acc=("teacher_acc", "mean"), teacher_sd=("teacher_acc", "std"),
                    student_acc=("student_acc", "mean"), student_sd=("student_acc", "std"),
                    runs=("seed", "size"), worlds=("world", "nunique")).reset_index()
    order = {m: i for i, m in enumerate(("greedy", *ORDER))}
    summary = summary.sort_values(["method", by], key=lambda s: s.map(order) if s.name == "method" else -s)
    head = "target (points)" if by == "target" else "param"
    out = ["## Results (mean over worlds and seeds)", "",
           f"| method | {head} | teacher acc % (sd) | student acc % (sd) | runs | worlds |", "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        key = getattr(r, by)
        cell = "–" if not np.isfinite(key) else (f"{key:+g}" if by == "target" else f"{key:g}")
        out.append(f"| {r.method} | {cell} | {pct_text(r.teacher_acc)} ({pct_text(r.teacher_sd)}) | "
                   f"{pct_text(r.student_acc)} ({pct_text(r.student_sd)}) | {r.runs} | {r.worlds} |")
    n = df.n_test.dropna().unique() if "n_test" in df.columns else []
    return out + ["", f"Test problems per evaluation: {', '.join(str(int(v)) for v in n) or '–'}.", ""]


MEANING = ["## What the intervals mean", "",
           "The unit of replication is the world build: a toy world built from one seed (teacher, proxy, student "
           "and problems), calibrated and swept. Within a world, each defended run is compared with the "
           "temperature run at the same seed and target; a world's effect is the mean over its runs. The effect "
           "may differ from world to world.", "",
           "- **next world build** (K ≥ 2 worlds): the interval is a t interval on K − 1 degrees of freedom over "
           "the K world effects. It covers the mean effect over world builds made like these, so it is a claim "
           "about the next build, not only about the K measured. With few worlds it is wide by design.",
           "- **this world build only** (one world): the interval reflects seeds and test sampling inside that one "
           "build. It says nothing about another build; no verdict is drawn from it.", "",
           "Every interval is 95%, two-sided, per contrast; the many contrasts printed are not corrected for "
           "multiplicity: the verdict rests on the pre-registered primary endpoint alone.", ""]


def _distiller_lines(df: pd.DataFrame) -> list[str]:
    """The distiller × arm tables (issue 17), at the primary target when the design has targets: student
    accuracy (the endpoint), then student NLL on the true solutions (the secondary)."""
    if "distiller" not in df.columns or df.distiller.fillna("naive").nunique() < 2:
        return []
    target = PRIMARY_TARGET if PRIMARY_TARGET in targets_of(df) else None
    arms = [a for a in ("whitebox", "antidistill") if (df.method == a).any()]
    # every distiller on the same footing: the worlds where every variant ran, and (a design with targets) only
    # the target's runs, each gap the plain paired difference, the naive one's too (a variant has one
    # temperature run per world there: no range of teacher accuracy to fit a slope on)
    df = own_seed_rows(df)  # the variants run at the sweeps' own seeds: the naive row on the same footing
    kind = df.distiller.fillna("naive")
    if "world" in df.columns:
        worlds = [set(df.world[kind == d]) for d in kind.unique() if d != "naive"]
        df = df[df.world.isin(set.intersection(*worlds))]
    if target is not None:
        df = df[np.isclose(df.target.astype(float), target)]
    where = f"at the {target:+g}-point target" if target is not None else "over all runs"
    footing = (" Every row, naive included, is the plain paired difference at that target, not adjusted by a "
               "teacher-accuracy slope (a variant has one temperature run per world there), over the worlds where "
               "every variant ran, so the naive row can differ from the primary endpoint.") if target is not None else ""
    out = ["## Adaptive distillers", "",
           f"Each defended arm's gap to temperature {where}, when the distiller applies the same variant to both "
           "arms' traces (world-level intervals as above), the share of the naive gap that variant recovers "
           "(a ratio of two estimates, no interval), and the mean accuracy of the arm's and temperature's students "
           f"under it (a variant whose students all fail shows small gaps that mean nothing).{footing} What each variant does: `docs/threat-model.md`.", "",
           *distiller_table_lines(distiller_table(
               df, lambda runs, arm: pooled_effect(runs, arm, target=target, adjust=False), arms,
               level="student_acc")), ""]
    if "student_test_nll" in df.columns and df.student_test_nll.notna().any():
        nll = distiller_table(df, lambda runs, arm: pooled_effect(runs, arm, y="student_test_nll", target=target,
                                                                  adjust=False), arms, level="student_test_nll",
                              harm=+1)
        out += ["Secondary: the same gaps in student NLL on the true solutions (nats/token; higher = the student "
                "learned the task worse), and the share of the naive NLL gap each variant recovers (negative: the "
                "gap grew; a ratio of two noisy estimates, and meaningless where the students collapse).", "",
                *distiller_table_lines(nll, scale=1.0, digits=3, unit="nats/token", level_name="student NLL"), ""]
    return out


@dataclass(frozen=True)
class ReportFrames:
    """The rows each section of the report reads, from pooled sources.

    ``design``: the rows every effect reads: worlds that pass the gate, the base student, arms without a
    named model, the naive distiller. ``everything``: the same but with the failing worlds (the trade-off
    plot and the results table). ``panel``: passing worlds' naive rows with the zoo and panel (the transfer
    sections). ``by_distiller``: ``design`` with issue 17's distillers beside the naive one."""

    worlds: list[dict]
    failing: set
    design: pd.DataFrame
    everything: pd.DataFrame
    panel: pd.DataFrame
    by_distiller: pd.DataFrame


def report_frames(sources: list[Source]) -> ReportFrames:
    """Split the pooled rows of ``sources`` into what each section of the report reads (:class:`ReportFrames`)."""
    df = pooled_results(sources)
    worlds = world_table(sources, default_rows(df))
    # pre-registered (docs/design.md): a world that fails the gate is reported, not pooled
    failing = {r["world"] for r in worlds if np.isfinite(r["gate"]["greedy_student_acc"]) and not r["gate"]["passes"]}
    passing = df[~df.world.isin(failing)]
    by_distiller = default_rows(passing)
    return ReportFrames(worlds=worlds, failing=failing, design=naive_rows(by_distiller),
                        everything=naive_rows(default_rows(df)), panel=naive_rows(passing),
                        by_distiller=by_distiller)


def write_report(path: str | Path, pool=(), out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``forest.png``, ``tradeoff.png`` and ``loss_dynamics.png`` into ``out``
    (default ``path``) from the results under ``path`` and ``pool`` (each a run directory, a compact
    world directory or a folder of them; ``results_io.load_sources``). Returns the report's path."""
    sources = load_sources((path, *pool))
    frames = report_frames(sources)
    worlds, failing, df = frames.worlds, frames.failing, frames.design
    everything, panel_df, by_distiller = frames.everything, frames.panel, frames.by_distiller
    files = RunDir(out if out is not None else path)
    files.root.mkdir(parents=True, exist_ok=True)
    labels = {r["world"]: r["label"] for r in worlds}
    acc_rows = effect_rows(df)
    plot_forest(acc_rows, {w: lab for w, lab in labels.items() if w not in failing}, files.forest_plot)  # effects' worlds
    plot_tradeoff(everything, files.tradeoff_plot)
    histories: dict[str, list] = {}
    for s in sources:
        for point, h in s.histories.items():
            if "@" in point:  # the zoo's arms: the transfer sections' (loss curves show the design's own arms)
                continue
            histories.setdefault(point.rsplit("_", 2)[0], []).append(h)
    rank = {m: i for i, m in enumerate(ORDER)}
    plot_loss_dynamics(dict(sorted(histories.items(), key=lambda kv: rank.get(kv[0], len(rank)))), files.loss_plot)
    name = sources[0].config.get("name", sources[0].root.name)
    k = df.world.nunique()
    n_all = len(worlds)
    pooled = f", pooled over {k} world builds" + (f" (of {n_all}; {n_all - k} {'fails' if n_all - k == 1 else 'fail'} the gate)" if n_all > k else "")
    lines = [f"# antidistill report: `{name}`" + (pooled if k > 1 else ""), ""]
    transfer = has_transfer_design(panel_df)
    lines += (headline_lines(panel_df) if transfer else []) + _verdict_lines(df) + _worlds_lines(worlds)
    if failing:
        lines += [f"The {len(failing)} world build(s) that fail the gate are left out of every effect below "
                  "(pre-registered); their runs stay in the trade-off plot and the results table.", ""]
    lines += ["## Effects: student accuracy", "",
              "Each contrast at each target and pooled over targets, in student accuracy points (negative = students "
              "learn less from that arm's traces than from temperature's). Per-world effects: `forest.png`.", ""]
    lines += _effect_table(acc_rows, 100.0, 1, "points") + ["", "![forest plot](forest.png)", ""]
    lines += _ladder_lines(df)
    lines += (transfer_lines(panel_df) + ensemble_lines(panel_df)) if transfer else []
    if "student_test_nll" in df.columns:
        lines += ["## Secondary endpoint: student NLL on the true solutions", "",
                  "Mean NLL per token of the distilled students on the ground-truth test solutions (higher = the "
                  "student learned the task worse), same contrasts and intervals.", ""]
        lines += _effect_table(effect_rows(df, y="student_test_nll"), 1.0, 3, "nats/token") + [""]
    lines += _nll_class_lines(df)
    lines += _distiller_lines(by_distiller)
    lines += ["## Matched teacher accuracy", "",
              "Every comparison above is at matched teacher accuracy: paired at the same target (calibrated on the "
              f"holdout) and {_adjustment(df, 'remaining')}, or, in a design "
              "without targets, against the world's temperature line. The trade-off plot shows every run.", "",
              "![trade-off](tradeoff.png)", "", "![loss dynamics](loss_dynamics.png)", ""]
    lines += _results_lines(everything)
    lines += calibration_lines(sources, labels)
    lines += fd_lines(sources, labels, embed=(files.root / "fd_error.png").is_file())
    lines += MEANING + settings_lines(sources)
    return write_text_atomic(files.report, "\n".join(lines))
