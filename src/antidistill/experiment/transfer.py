"""Which proxy property carries antidistillation's effect, and what an owner gets against students never seen
(issue 16): the proxy × student transfer matrix, the pre-registered contrasts and the held-out headline.

Every results row says which proxy made its traces (``proxy``; None for arms without one) and which student
learned from them (``student``, ``base_student``), with their families and sizes (``proxy_family``,
``proxy_size``: the proxy's spec against the base student's, ``"same"``, ``"smaller"`` or ``"larger"``;
``student_family``). Rows written before the zoo existed read with :func:`fill_panel_labels`' defaults.

A matrix cell (proxy ``p``, student ``s``) is the antidistillation arm that ran with proxy ``p``
(``antidistill``, ``antidistill@p``; ``whitebox``/``whitebox@p`` when ``p`` is a panel student, the diagonal),
its traces distilled into ``s``, against temperature's traces distilled into ``s``, at matched teacher
accuracy: :func:`~antidistill.experiment.inference.run_effects` on ``s``'s rows, per-world effects, a t(K−1)
interval over K world builds (one world: that build's own interval). Contrasts between cells are per-world
differences of cell effects, with the same interval.

Equivalence (:func:`equivalence`): a difference is read as absent ("does not transfer", "no difference")
only when its whole 95% interval lies inside ±``margin`` (2 points): two one-sided tests at 2.5% each, a
stricter form of the usual 90%-interval TOST.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .arms import ARMS, base_arm
from .inference import run_effects, summarize, world_effects

# what rows written before the zoo existed were: the shipped Qwen2 proxy at 1/5 the size of the GPT-2 student
LEGACY_PROXY, LEGACY_STUDENT = "qwen2-small", "gpt2"
MARGIN = 0.02  # the equivalence margin: ±2 student-accuracy points
CELL_ARMS = ("antidistill", "whitebox")  # the arms whose effect a cell reads (their permutations are controls)


def fill_panel_labels(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the proxy and student labels an older table lacks: the shipped proxy (``qwen2-small``, smaller
    than the student) for the proxy arms, the base student (``gpt2``) as the white-box arms' proxy and as every
    row's student."""
    df = df.copy()
    if "student" not in df.columns:
        df["student"], df["student_family"] = LEGACY_STUDENT, "gpt2"
    if "base_student" not in df.columns:
        df["base_student"] = df["student"] == LEGACY_STUDENT
    if "proxy" not in df.columns:
        kind = df["method"].map(lambda m: ARMS[base_arm(m)].proxy if base_arm(m) in ARMS else None)
        df["proxy"] = kind.map({"proxy": LEGACY_PROXY, "student": LEGACY_STUDENT})
        df["proxy_family"] = kind.map({"proxy": "qwen2", "student": "gpt2"})
        df["proxy_size"] = kind.map({"proxy": "smaller", "student": "same"})
    for col in ("student_family", "proxy_family", "proxy_size"):  # rows of real models carry names only
        if col not in df.columns:
            df[col] = None
    df["base_student"] = df["base_student"].fillna(True).astype(bool)
    return df


def default_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the design before the zoo: the base student's, of arms without a named model (no ``@``)."""
    df = fill_panel_labels(df)
    return df[df.base_student & ~df.method.astype(str).str.contains("@")]


def naive_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The naive distiller's rows (rows without a ``distiller`` are the naive one's); issue 17's variants dropped."""
    return df[df.distiller.fillna("naive") == "naive"] if "distiller" in df.columns else df


def cell_methods(df: pd.DataFrame) -> dict[str, str]:
    """Proxy name → the method (arm) whose traces that proxy made, for the matrix's arms (``CELL_ARMS``)."""
    df = fill_panel_labels(df)
    m = df[df.method.map(base_arm).isin(CELL_ARMS) & df.proxy.notna()][["method", "proxy"]].drop_duplicates()
    return dict(zip(m.proxy, m.method))


def _cell_effects(df: pd.DataFrame, student: str, method: str, y: str, target: float | None) -> pd.DataFrame:
    rows = naive_rows(df[df.student == student])
    return world_effects(run_effects(rows, y=y), method, target=target)


def transfer_matrix(df: pd.DataFrame, *, y: str = "student_acc", target: float | None = None) -> list[dict]:
    """Every (proxy, student) cell with runs: dicts with ``proxy``, ``student``, ``method``, ``whitebox``
    (proxy is student), ``e`` (the summary of :func:`~antidistill.experiment.inference.summarize`, ``y`` − its
    temperature value at matched teacher accuracy) and ``nll`` (the same on ``student_test_nll``, None without it).
    Proxies in the order the rows first name them, students likewise."""
    df = fill_panel_labels(df)
    methods = cell_methods(df)
    students = list(dict.fromkeys(df.student))
    out = []
    for p, m in methods.items():
        for s in students:
            e = summarize(_cell_effects(df, s, m, y, target))
            if e is None:
                continue
            nll = (summarize(_cell_effects(df, s, m, "student_test_nll", target))
                   if "student_test_nll" in df.columns and y != "student_test_nll" else None)
            out.append({"proxy": p, "student": s, "method": m, "whitebox": p == s, "e": e, "nll": nll})
    return out


def combined_effect(df: pd.DataFrame, cells: list[tuple[str, str]], minus: list[tuple[str, str]] = (), *,
                    y: str = "student_acc", target: float | None = None, weights=None, minus_weights=None
                    ) -> dict | None:
    """Per world, the mean effect over ``cells`` (each ``(student, method)``) minus the mean over ``minus``,
    then the world-level interval (``summarize``). Only worlds holding every cell count. ``weights`` /
    ``minus_weights``: a weighted mean instead (normalised to sum 1; the variance sums w_i²·var_i)."""
    df = fill_panel_labels(df)

    def mean_of(group, w):
        parts = [_cell_effects(df, s, m, y, target).set_index("world") for s, m in group]
        if not parts or any(p.empty for p in parts):
            return None
        joined = pd.concat([p[["d", "var", "n_runs", "n_seeds"]] for p in parts], axis=1, keys=range(len(parts)),
                           join="inner")
        k = len(parts)
        w = np.full(k, 1.0 / k) if w is None else np.asarray(w, float) / np.sum(w)
        return pd.DataFrame({"d": sum(w[i] * joined[(i, "d")] for i in range(k)),
                             "var": sum(w[i] ** 2 * joined[(i, "var")] for i in range(k)),
                             "n_runs": sum(joined[(i, "n_runs")] for i in range(k)),
                             "n_seeds": np.min([joined[(i, "n_seeds")] for i in range(k)], axis=0)},
                            index=joined.index)
    a = mean_of(list(cells), weights)
    if a is None:
        return None
    if minus:
        b = mean_of(list(minus), minus_weights)
        if b is None:
            return None
        a = a.join(b, rsuffix="_b", how="inner")
        a = pd.DataFrame({"d": a.d - a.d_b, "var": a["var"] + a["var_b"], "n_runs": a.n_runs + a.n_runs_b,
                          "n_seeds": np.minimum(a.n_seeds, a.n_seeds_b)})
    a = a.assign(sd_seeds=np.nan)
    return summarize(a.rename_axis("world").reset_index())


def equivalence(e: dict | None, margin: float = MARGIN) -> str:
    """``"equivalent"`` (the interval lies inside ±margin, even when it excludes 0: any difference is smaller
    than the margin), else ``"below"``/``"above"`` (it excludes 0 on that side), else ``"inconclusive"`` (it holds
    0 and reaches past the margin); ``"–"`` for no estimate."""
    if e is None:
        return "–"
    if -margin <= e["ci_low"] and e["ci_high"] <= margin:
        return "equivalent"
    if e["ci_high"] < 0:
        return "below"
    if e["ci_low"] > 0:
        return "above"
    return "inconclusive"


def _proxy_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per antidistillation proxy: method, proxy, its family and size."""
    df = fill_panel_labels(df)
    rows = df[df.method.map(base_arm).isin(CELL_ARMS) & df.proxy.notna()]
    return rows[["method", "proxy", "proxy_family", "proxy_size"]].drop_duplicates("proxy")


def preregistered_contrasts(df: pd.DataFrame, *, y: str = "student_acc", target: float | None = None) -> list[dict]:
    """The three pre-registered contrasts (docs/design.md), on the base student, each a dict with ``key``,
    ``label``, ``plus``/``minus`` (the proxies on each side), ``e`` (None when a side has no runs) and
    ``reading`` (:func:`equivalence`):

    * ``exact``: white-box − the sibling (the student's family and size, another seed): what the exact weights
      and seed add;
    * ``family``: the sibling − the other families at the student's size (mean over them): what the family adds;
    * ``size``: the proxies at the student's size − the same families' smaller proxies (mean over the families
      that have both): what size adds.
    """
    df = fill_panel_labels(df)
    base = df[df.base_student]
    if base.empty:
        return []
    student = base.student.iloc[0]
    family = base.student_family.dropna().iloc[0] if base.student_family.notna().any() else None
    px = _proxy_table(base)
    ad = px[px.method.map(base_arm) == "antidistill"]
    wb = px[px.proxy == student]
    sib = ad[(ad.proxy_family == family) & (ad.proxy_size == "same")]
    others = ad[(ad.proxy_family != family) & (ad.proxy_size == "same")]
    fams = sorted(set(ad[ad.proxy_size == "same"].proxy_family) & set(ad[ad.proxy_size == "smaller"].proxy_family))
    big = ad[(ad.proxy_size == "same") & ad.proxy_family.isin(fams)]
    small = ad[(ad.proxy_size == "smaller") & ad.proxy_family.isin(fams)]
    specs = [("exact", "white-box − sibling (exact weights and seed)", wb, sib),
             ("family", "sibling − other families at the student's size (family)", sib, others),
             ("size", "student's size − about 1/5 size, same families (size)", big, small)]
    out = []
    for key, label, plus, minus in specs:
        e = None
        if len(plus) and len(minus):
            e = combined_effect(df, [(student, m) for m in plus.method], [(student, m) for m in minus.method], y=y,
                                target=target)
        out.append({"key": key, "label": label, "plus": list(plus.proxy), "minus": list(minus.proxy), "e": e,
                    "reading": equivalence(e) if y == "student_acc" else "–"})
    return out


def heldout_headline(df: pd.DataFrame, *, y: str = "student_acc", target: float | None = None) -> dict | None:
    """The owner's headline: the mean gap to temperature over the panel students whose family is not among the
    antidistillation proxies' families (the proxies an owner used), averaged over those proxies, per world,
    with the world-level interval. None when no student is held out or no cell has runs.

    Returns ``e`` (the summary) with ``students`` and ``proxies`` (what it averages over)."""
    df = fill_panel_labels(df)
    ad = _proxy_table(df)
    ad = ad[ad.method.map(base_arm) == "antidistill"]
    used = set(ad.proxy_family.dropna())
    students = (df[["student", "student_family"]].drop_duplicates("student"))
    held = [s for s, f in zip(students.student, students.student_family) if isinstance(f, str) and f not in used]
    if not held or ad.empty:
        return None
    cells = [(s, m) for s in held for m in ad.method]
    e = combined_effect(df, cells, y=y, target=target)
    if e is None:
        return None
    return {**e, "students": held, "proxies": list(ad.proxy), "families_used": sorted(used)}


def ensemble_leave_one_family_out(df: pd.DataFrame, *, y: str = "student_acc", target: float | None = None) -> list[dict]:
    """Ensemble antidistillation against each panel student, built without that student's family (issue 16).

    For each student: the ensemble arm that leaves its family out (``ensemble@-<family>``; the whole
    ``ensemble`` when no proxy shares the family; no estimate when a proxy shares it and that arm did not
    run), its gap to temperature (``e``), and that gap minus the mean gap of the same member proxies run
    alone (``vs_single``: does averaging the members' Δ̂ beat using them one at a time?). A last entry,
    ``student`` = None, pools the students: per world, the mean over students of each one's gap (``e``) and
    of each one's (ensemble − its members' mean) (``vs_single``). Empty when the rows have no ensemble arm."""
    df = fill_panel_labels(df)
    methods = set(df.method.astype(str))
    if "ensemble" not in methods:
        return []
    singles = _proxy_table(df)
    singles = singles[singles.method.map(base_arm) == "antidistill"]
    students = df[["student", "student_family"]].drop_duplicates("student")
    out, cells, single_cells, single_weights = [], [], [], []
    for s, fam in zip(students.student, students.student_family):
        shared = fam in set(singles.proxy_family)
        method = f"ensemble@-{fam}" if shared else "ensemble"
        members = singles[singles.proxy_family != fam]
        ran = method in methods
        e = combined_effect(df, [(s, method)], y=y, target=target) if ran else None
        vs = (combined_effect(df, [(s, method)], [(s, m) for m in members.method], y=y, target=target)
              if ran and len(members) else None)
        out.append({"student": s, "family": fam, "method": method, "members": list(members.proxy), "e": e,
                    "vs_single": vs})
        if e is not None:
            cells.append((s, method))
            single_cells += [(s, m) for m in members.method]
            single_weights += [1.0 / len(members)] * len(members)
    if len(cells) > 1:
        e = combined_effect(df, cells, y=y, target=target)
        # per world: mean over students of the ensemble gap − mean over students of its members' mean gap
        vs = (combined_effect(df, cells, single_cells, y=y, target=target, minus_weights=single_weights)
              if single_cells else None)
        out.append({"student": None, "family": None, "method": None, "members": [], "e": e, "vs_single": vs})
    return out
