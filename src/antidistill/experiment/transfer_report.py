"""The report's sections for the proxy zoo and the student panel (issue 16): the owner's headline against
held-out students, the proxy × student transfer matrix, and the pre-registered contrasts with their
equivalence readings. Every number comes from :mod:`antidistill.experiment.transfer`."""

from __future__ import annotations

import pandas as pd

from .inference import claim_note, targets_of
from .transfer import (
    MARGIN,
    ensemble_leave_one_family_out,
    equivalence,
    heldout_headline,
    preregistered_contrasts,
    transfer_matrix,
)


def has_transfer_design(df: pd.DataFrame) -> bool:
    """Whether the rows hold a proxy zoo's arms or a student panel (issue 16)."""
    return df.student.nunique() > 1 or df.method.astype(str).str.contains("@").any()


def _ci(e: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if e is None:
        return "–"
    f = f"{{:+.{digits}f}}"
    return f"{f.format(scale * e['estimate'])} [{f.format(scale * e['ci_low'])}, {f.format(scale * e['ci_high'])}]"


CELL_READING = {"equivalent": "does not transfer (inside ±{m:g})", "below": "transfers (hurts)",
                "above": "helps the student", "inconclusive": "inconclusive", "–": "–"}
CONTRAST_READING = {"equivalent": "no difference (inside ±{m:g})", "below": "lower", "above": "higher",
                    "inconclusive": "inconclusive", "–": "–"}


def _where(df: pd.DataFrame) -> str:
    """The pre-registered reading (docs/design.md): each world's effect pooled over the design's targets."""
    targets = targets_of(df)
    if not targets:
        return "over all runs"
    if len(targets) == 1:
        return f"at the {targets[0]:+g}-point target"
    return "pooled over the targets " + ", ".join(f"{t:+g}" for t in targets)


def headline_lines(df: pd.DataFrame) -> list[str]:
    """The owner's headline (issue 16): protection against students whose family no proxy shares."""
    h = heldout_headline(df)
    if h is None:
        return []
    where = _where(df)
    return ["## The owner's headline: protection against held-out students", "",
            f"**{_ci(h)} points** (95% CI; {claim_note(h)}): student accuracy under antidistillation − under "
            f"temperature, {where}, averaged over the panel students whose family no proxy shares "
            f"({', '.join(f'`{s}`' for s in h['students'])}) and over the proxies used "
            f"({', '.join(f'`{p}`' for p in h['proxies'])}; families {', '.join(h['families_used'])}). "
            f"Reading: {CELL_READING[equivalence(h)].format(m=100 * MARGIN)}.", ""]


def transfer_lines(df: pd.DataFrame) -> list[str]:
    """The transfer matrix and the three pre-registered contrasts (issue 16; docs/design.md)."""
    cells = transfer_matrix(df)
    if not cells:
        return []
    students = list(dict.fromkeys(c["student"] for c in cells))
    proxies = list(dict.fromkeys(c["proxy"] for c in cells))
    by = {(c["proxy"], c["student"]): c for c in cells}
    info = df.drop_duplicates("proxy").set_index("proxy")
    where = _where(df)
    m = 100 * MARGIN
    out = ["## Transfer matrix: proxy × student", "",
           f"Each cell: student accuracy under antidistillation with that proxy − under temperature, {where}, in "
           "points, at matched teacher accuracy (per-world paired effects, world-level 95% interval), with the NLL "
           "gap on the true solutions (nats/token) beside it. **wb**: white-box, the student as its own proxy. "
           f"Reading (equivalence margin ±{m:g} points): *does not transfer* only when the whole interval lies "
           f"inside ±{m:g}.", "",
           "| proxy | family | size | " + " | ".join(f"student `{s}`" for s in students) + " |",
           "|---|---|---|" + "---|" * len(students)]
    for p in proxies:
        fam = info.proxy_family.get(p, "–") if "proxy_family" in info.columns else "–"
        size = info.proxy_size.get(p, "–") if "proxy_size" in info.columns else "–"
        row = []
        for s in students:
            c = by.get((p, s))
            if c is None:
                row.append("–")
                continue
            nll = "" if c["nll"] is None else f"; NLL {_ci(c['nll'], 1.0, 3)}"
            row.append(("**wb** " if c["whitebox"] else "") + _ci(c["e"]) + nll + " — "
                       + CELL_READING[equivalence(c["e"])].format(m=m))
        out.append(f"| `{p}` | {fam} | {size} | " + " | ".join(row) + " |")
    out += ["", "### Pre-registered contrasts (base student)", "",
            f"Per-world differences of cell effects, world-level 95% intervals; equivalence margin ±{m:g} points "
            "(docs/design.md).", "",
            "| contrast | + | − | student accuracy (points) | reading | NLL (nats/token) |", "|---|---|---|---|---|---|"]
    nll = {c["key"]: c for c in preregistered_contrasts(df, y="student_test_nll")} \
        if "student_test_nll" in df.columns else {}
    for c in preregistered_contrasts(df):
        out.append(f"| {c['label']} | {', '.join(c['plus']) or '–'} | {', '.join(c['minus']) or '–'} | {_ci(c['e'])} | "
                   f"{CONTRAST_READING[c['reading']].format(m=m)} | {_ci(nll.get(c['key'], {}).get('e'), 1.0, 3)} |")
    return out + [""]


def ensemble_lines(df: pd.DataFrame) -> list[str]:
    """Ensemble antidistillation, each panel student against the ensemble built without its family (issue 16)."""
    rows = ensemble_leave_one_family_out(df)
    if not rows:
        return []
    m = 100 * MARGIN
    out = ["## Ensemble antidistillation, leave one family out", "",
           f"Each panel student against the equal-weight ensemble of the proxies whose family is not its own "
           f"(Δ̂ = the mean of their Δ̂), {_where(df)}: its gap to temperature, and that gap minus the mean gap of "
           "the same proxies run one at a time (below 0: the ensemble hurts the student more than its members "
           "do alone). Points, world-level 95% intervals.", "",
           "| student | ensemble | members | gap to temperature | reading | ensemble − its members alone |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        who = f"`{r['student']}` ({r['family']})" if r["student"] is not None else "**all students (mean)**"
        out.append(f"| {who} | {r['method'] or '–'} | {', '.join(r['members']) or '–'} | {_ci(r['e'])} | "
                   f"{CELL_READING[equivalence(r['e'])].format(m=m)} | {_ci(r['vs_single'])} |")
    return out + [""]
