"""The report's provenance sections: each world's calibration, FD check and settings, and the number format
the report's tables share."""

from __future__ import annotations

import numpy as np

from .results_io import Source

FEW_WORLDS = 3  # up to this many worlds, the calibration is shown in full per world


def pct_text(v, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def source_name(s: Source, labels: dict[str, str]) -> str:
    """A source by its world's label, or (a source holding several worlds) by its path and their labels."""
    names = ", ".join(labels.get(w, w) for w in s.worlds)
    return names if len(s.worlds) == 1 else f"`{s.root}` (one file for {names})"


def calibration_lines(sources: list[Source], labels: dict[str, str]) -> list[str]:
    cals = [(s, s.calibration) for s in sources if s.calibration is not None]
    if not cals:
        return []
    out = ["## Calibration (holdout only)", "",
           "Teacher accuracy on the holdout (delivered scoring) over each arm's τ or λ; each target's value is read "
           "off the measured curve. Targets are points relative to the best undefended teacher (older calibrations: "
           "absolute accuracies). No student is involved. (outside): the target lies outside the measured curve and "
           "the curve's end was used.", ""]
    name = {id(s): source_name(s, labels) for s, _ in cals}
    if len(cals) > FEW_WORLDS:
        out += ["| world | holdout problems | best undefended % | base τ | picks outside the measured curve |",
                "|---|---|---|---|---|"]
        for s, c in cals:
            outside = [f"{arm} {p['target']:+g}" for arm, ps in c["chosen"].items() for p in ps
                       if not p["inside_measured_range"]]
            out.append(f"| {name[id(s)]} | {c.get('n_holdout', '–')} | {pct_text(c.get('best_undefended'))} | "
                       f"{c.get('base_tau', '–')} | {', '.join(outside) or 'none'} |")
        return out + [""]
    for s, c in cals:
        out += [f"### {name[id(s)]}", ""]
        if "best_undefended" in c:
            out.append(f"Best undefended {pct_text(c['best_undefended'])}% on {c['n_holdout']} holdout problems; base τ "
                       f"{c.get('base_tau', '–')} ({c.get('base_tau_reason', '')}).")
            out.append("")
        out += ["| arm | measured: param → teacher acc % | chosen: target → param |", "|---|---|---|"]
        for arm, ms in c["measured"].items():
            curve = ", ".join(f"{m['param']:g} → {pct_text(m['teacher_acc'])}" for m in ms)
            picks = ", ".join(f"{p['target']:g} → {p['param']:g}" + ("" if p["inside_measured_range"] else " (outside)")
                              for p in c["chosen"].get(arm, []))
            out.append(f"| {arm} | {curve} | {picks or '–'} |")
        out.append("")
    return out


def fd_lines(sources: list[Source], labels: dict[str, str], embed: bool) -> list[str]:
    checks = [s for s in sources if s.fd_check is not None]
    if not checks:
        return []
    out = ["## Finite-difference check", ""] + (["![fd error](fd_error.png)", ""] if embed else [])
    out += ["Sine error of the finite-difference Δ̂ against autograd (appendix B.1), per world build.", "",
            "| world | best ε (float32) | best ε (bfloat16) | at the run's ε (float32) | JVP |", "|---|---|---|---|---|"]
    for s in checks:
        info, sampling = s.fd_check, s.config.get("sampling") or {}
        at = [r for r in info["rows"] if r["difference"] == sampling.get("difference") and r["dtype"] == "float32"
              and abs(r["eps"] - sampling.get("eps", float("nan"))) < 1e-15]
        jvp = [r for r in info["rows"] if r["difference"] == "jvp"]
        out.append(f"| {source_name(s, labels)} | {info.get('best_eps_float32', '–'):g} | "
                   f"{info.get('best_eps_bfloat16', '–'):g} | "
                   + (f"ε = {sampling['eps']:g}: {at[0]['mean_sine_error']:.2e}" if at else "–") + " | "
                   + (f"{jvp[0]['mean_sine_error']:.2e}" if jvp else "–") + " |")
    return out + [""]


def flatten_settings(d, prefix=""):
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            yield from flatten_settings(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def settings_lines(sources: list[Source]) -> list[str]:
    out = ["## Settings", "", f"From `{sources[0].root}`:", "", "```yaml", sources[0].config_text.rstrip(), "```", ""]
    if len(sources) > 1:
        flat = [dict(flatten_settings(s.config)) for s in sources]
        differ = sorted(k for k in set().union(*flat) if len({repr(f.get(k)) for f in flat}) > 1)
        out += [f"The {len(sources)} sources' configs differ in: " + (", ".join(f"`{k}`" for k in differ) or "nothing")
                + ".", ""]
    return out
