"""The transfer matrix, the pre-registered contrasts, their equivalence reading and the held-out headline,
on synthetic rows whose cells are computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from antidistill.experiment.transfer import (
    combined_effect,
    default_rows,
    equivalence,
    fill_panel_labels,
    heldout_headline,
    preregistered_contrasts,
    transfer_matrix,
)

# proxy name → (method, family, size); the base student is gpt2, the panel adds opt and neox
PROXIES = {"qwen2-small": ("antidistill", "qwen2", "smaller"), "gpt2-sibling": ("antidistill@gpt2-sibling", "gpt2", "same"),
           "llama-same": ("antidistill@llama-same", "llama", "same"), "qwen2-same": ("antidistill@qwen2-same", "qwen2", "same"),
           "gpt2-small": ("antidistill@gpt2-small", "gpt2", "smaller"), "gpt2": ("whitebox", "gpt2", "same"),
           "opt": ("whitebox@opt", "opt", "same")}
STUDENTS = {"gpt2": "gpt2", "opt": "opt", "neox": "gpt_neox"}
WORLDS = ("w0", "w1", "w2", "w3")


def gap(proxy: str, student: str, w: int) -> float:
    """The synthetic effect (accuracy gap to temperature) of a cell in world ``w``: distinct per cell and world."""
    p, s = list(PROXIES).index(proxy), list(STUDENTS).index(student)
    return -0.01 * (p + 1) + 0.003 * s + 0.004 * ((w * 7 + p * 3 + s) % 5) - 0.008


def synthetic_rows() -> pd.DataFrame:
    rows = []
    for w, world in enumerate(WORLDS):
        for s, fam in STUDENTS.items():
            temp = 0.4 + 0.01 * w
            base = {"world": world, "seed": 0, "target": -5.0, "teacher_acc": 0.8, "n_test": 4000, "student": s,
                    "student_family": fam, "base_student": s == "gpt2", "distiller": "naive"}
            rows.append(base | {"method": "temperature", "student_acc": temp, "student_test_nll": 1.0 + w / 10,
                                "proxy": None, "proxy_family": None, "proxy_size": None})
            for p, (m, pf, size) in PROXIES.items():
                rows.append(base | {"method": m, "student_acc": temp + gap(p, s, w),
                                    "student_test_nll": 1.0 + w / 10 - gap(p, s, w) / 10, "proxy": p,
                                    "proxy_family": pf, "proxy_size": size})
    return pd.DataFrame(rows)


def t_interval(d):
    d = np.asarray(d, float)
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - h, d.mean() + h


def test_matrix_cells_are_the_hand_computed_world_level_gaps():
    cells = transfer_matrix(synthetic_rows())
    assert len(cells) == len(PROXIES) * len(STUDENTS)
    for c in cells:
        est, lo, hi = t_interval([gap(c["proxy"], c["student"], w) for w in range(len(WORLDS))])
        assert c["e"]["estimate"] == pytest.approx(est) and c["e"]["ci_low"] == pytest.approx(lo)
        assert c["e"]["ci_high"] == pytest.approx(hi) and c["e"]["n_worlds"] == 4
        nll = t_interval([-gap(c["proxy"], c["student"], w) / 10 for w in range(len(WORLDS))])
        assert c["nll"]["estimate"] == pytest.approx(nll[0]) and c["nll"]["ci_low"] == pytest.approx(nll[1])
        assert c["whitebox"] == (c["proxy"] == c["student"])
    assert {(c["proxy"], c["student"]) for c in cells if c["whitebox"]} == {("gpt2", "gpt2"), ("opt", "opt")}


def test_the_contrasts_are_per_world_differences_of_cell_means():
    out = {c["key"]: c for c in preregistered_contrasts(synthetic_rows())}
    n = range(len(WORLDS))
    exact = [gap("gpt2", "gpt2", w) - gap("gpt2-sibling", "gpt2", w) for w in n]
    family = [gap("gpt2-sibling", "gpt2", w) - (gap("llama-same", "gpt2", w) + gap("qwen2-same", "gpt2", w)) / 2
              for w in n]
    size = [(gap("gpt2-sibling", "gpt2", w) + gap("qwen2-same", "gpt2", w)) / 2
            - (gap("gpt2-small", "gpt2", w) + gap("qwen2-small", "gpt2", w)) / 2 for w in n]
    for key, d in (("exact", exact), ("family", family), ("size", size)):
        est, lo, hi = t_interval(d)
        e = out[key]["e"]
        assert (e["estimate"], e["ci_low"], e["ci_high"]) == pytest.approx((est, lo, hi)), key
        assert out[key]["reading"] == equivalence(e)
    assert out["exact"]["plus"] == ["gpt2"] and out["exact"]["minus"] == ["gpt2-sibling"]
    assert sorted(out["family"]["minus"]) == ["llama-same", "qwen2-same"]
    assert sorted(out["size"]["plus"]) == ["gpt2-sibling", "qwen2-same"]
    assert sorted(out["size"]["minus"]) == ["gpt2-small", "qwen2-small"]


@pytest.mark.parametrize(("lo", "hi", "reading"), [(-0.015, 0.019, "equivalent"), (-0.02, 0.02, "equivalent"),
                                                   (-0.025, 0.01, "inconclusive"), (-0.05, -0.001, "below"),
                                                   (0.001, 0.015, "equivalent"), (0.001, 0.025, "above"),
                                                   (-0.01, 0.021, "inconclusive")])
def test_equivalence_reads_absent_only_inside_the_margin(lo, hi, reading):
    assert equivalence({"ci_low": lo, "ci_high": hi}) == reading
    assert equivalence(None) == "–"


def test_the_headline_averages_the_students_whose_family_no_proxy_has():
    df = synthetic_rows()
    h = heldout_headline(df)
    # the antidistillation proxies are qwen2, gpt2 and llama: opt and neox are held out (the white-box arm's
    # proxy opt is the student itself, not a proxy an owner used)
    assert sorted(h["students"]) == ["neox", "opt"] and h["families_used"] == ["gpt2", "llama", "qwen2"]
    ad = [p for p, (m, _, _) in PROXIES.items() if m.startswith("antidistill")]
    d = [np.mean([gap(p, s, w) for s in ("opt", "neox") for p in ad]) for w in range(len(WORLDS))]
    est, lo, hi = t_interval(d)
    assert (h["estimate"], h["ci_low"], h["ci_high"]) == pytest.approx((est, lo, hi))
    # a proxy of the opt family makes opt no longer held out
    extra = df[(df.method == "antidistill@llama-same")].assign(method="antidistill@opt-same", proxy="opt-same",
                                                              proxy_family="opt")
    assert heldout_headline(pd.concat([df, extra]))["students"] == ["neox"]
    assert heldout_headline(df[df.student == "gpt2"]) is None  # no held-out student


def test_one_world_gives_that_builds_interval_and_missing_cells_give_none():
    df = synthetic_rows()
    one = df[df.world == "w0"]
    e = combined_effect(one, [("gpt2", "whitebox")], [("gpt2", "antidistill@gpt2-sibling")])
    assert e["claim"] == "this world build only" and e["estimate"] == pytest.approx(
        gap("gpt2", "gpt2", 0) - gap("gpt2-sibling", "gpt2", 0))
    assert combined_effect(df, [("gpt2", "antidistill@nothing")]) is None


def test_older_rows_read_with_the_shipped_proxy_and_the_base_student():
    old = pd.DataFrame({"method": ["temperature", "antidistill", "whitebox", "permutation"], "world": "w",
                        "seed": 0, "teacher_acc": 0.8, "student_acc": 0.4})
    df = fill_panel_labels(old)
    assert list(df.proxy.fillna("-")) == ["-", "qwen2-small", "gpt2", "qwen2-small"]
    assert set(df.student) == {"gpt2"} and df.base_student.all()
    assert list(df.proxy_size.fillna("-")) == ["-", "smaller", "same", "smaller"]
    new = synthetic_rows()
    assert set(default_rows(new).method) == {"temperature", "antidistill", "whitebox"}
    assert set(default_rows(new).student) == {"gpt2"}


def test_the_report_leads_with_the_headline_and_prints_the_matrix_and_contrasts(tmp_path):
    from antidistill.experiment.report import write_report

    src = tmp_path / "worlds"
    src.mkdir()
    synthetic_rows().to_csv(src / "results.csv", index=False)
    (src / "config.yaml").write_text("name: transfer\n")
    text = write_report(src).read_text()
    assert text.index("## The owner's headline") < text.index("## Verdict") < text.index("## Transfer matrix")
    h = heldout_headline(synthetic_rows())
    assert f"**{100 * h['estimate']:+.1f} [{100 * h['ci_low']:+.1f}, {100 * h['ci_high']:+.1f}] points**" in text
    matrix = text[text.index("## Transfer matrix"):text.index("### Pre-registered contrasts")]
    assert matrix.count("| `") == len(PROXIES) and matrix.count("| **wb** ") == 2
    wb = next(c for c in transfer_matrix(synthetic_rows()) if c["proxy"] == c["student"] == "gpt2")
    assert f"**wb** {100 * wb['e']['estimate']:+.1f} [{100 * wb['e']['ci_low']:+.1f}" in matrix
    for label in ("white-box − sibling", "sibling − other families", "about 1/5 size"):
        assert label in text
    # the design's own sections read the base student's rows of arms without a named model only
    results = text[text.index("## Results (mean over worlds and seeds)"):]
    assert "@" not in results.split("##")[1]


def test_rows_of_real_models_have_no_families_and_no_held_out_student():
    df = synthetic_rows().drop(columns=["student_family", "proxy_family", "proxy_size"])
    assert heldout_headline(df) is None  # without families nothing is known to be held out
    assert len(transfer_matrix(df)) == len(PROXIES) * len(STUDENTS)
    assert all(c["e"] is None for c in preregistered_contrasts(df))


def with_ensembles(df: pd.DataFrame) -> pd.DataFrame:
    """``synthetic_rows`` plus the ensemble arms: the whole ensemble and the one without gpt2 proxies, each with a
    gap of its own per student and world."""
    extra = []
    for (world, s), grp in df[df.method == "temperature"].groupby(["world", "student"]):
        temp = grp.iloc[0]
        for k, (m, label) in enumerate([("ensemble", "ensemble"), ("ensemble@-gpt2", "ensemble-gpt2")]):
            w = WORLDS.index(world)
            extra.append(temp.to_dict() | {"method": m, "proxy": label, "proxy_family": "mix", "proxy_size": "ensemble",
                                           "student_acc": temp.student_acc - 0.02 * (k + 1) - 0.005 * ((w + k) % 3)})
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True)


def test_the_ensemble_meets_each_student_without_its_family():
    from antidistill.experiment.transfer import ensemble_leave_one_family_out

    df = with_ensembles(synthetic_rows())
    rows = {r["student"]: r for r in ensemble_leave_one_family_out(df)}
    assert rows["gpt2"]["method"] == "ensemble@-gpt2" and rows["opt"]["method"] == "ensemble"
    assert rows["gpt2"]["members"] == ["qwen2-small", "llama-same", "qwen2-same"]  # the antidistill proxies, no gpt2
    assert rows["neox"]["members"] == list(p for p, v in PROXIES.items() if v[0].startswith("antidistill"))
    # by hand: the gpt2 student's gap is the ensemble@-gpt2 row's, per world; its members' mean gap per world
    d = [-0.04 - 0.005 * ((w + 1) % 3) for w in range(len(WORLDS))]
    est, lo, hi = t_interval(d)
    assert rows["gpt2"]["e"]["estimate"] == pytest.approx(est) and rows["gpt2"]["e"]["ci_low"] == pytest.approx(lo)
    singles = [np.mean([gap(p, "gpt2", w) for p in ("qwen2-small", "llama-same", "qwen2-same")]) for w in range(4)]
    est_vs, _, _ = t_interval(np.subtract(d, singles))
    assert rows["gpt2"]["vs_single"]["estimate"] == pytest.approx(est_vs)
    pooled = rows[None]
    ens = {"gpt2": lambda w: -0.04 - 0.005 * ((w + 1) % 3), "opt": lambda w: -0.02 - 0.005 * (w % 3),
           "neox": lambda w: -0.02 - 0.005 * (w % 3)}
    per_world = [np.mean([f(w) for f in ens.values()]) for w in range(4)]
    assert pooled["e"]["estimate"] == pytest.approx(np.mean(per_world))
    # pooled vs_single: per world, the mean over students of (their ensemble − the mean of its members alone)
    members = {s: rows[s]["members"] for s in ens}
    vs = [np.mean([ens[s](w) - np.mean([gap(p, s, w) for p in members[s]]) for s in ens]) for w in range(4)]
    est, lo, hi = t_interval(vs)
    assert pooled["vs_single"]["estimate"] == pytest.approx(est) and pooled["vs_single"]["ci_low"] == pytest.approx(lo)
    # a student whose family a proxy shares gets no estimate when its leave-one-out ensemble did not run
    without = {r["student"]: r for r in ensemble_leave_one_family_out(df[df.method != "ensemble@-gpt2"])}
    assert without["gpt2"]["e"] is None and without["opt"]["e"] is not None
    # the matrix, the contrasts and the headline read single proxies only
    assert "ensemble" not in {c["proxy"] for c in transfer_matrix(df)}
    assert heldout_headline(df)["proxies"] == heldout_headline(synthetic_rows())["proxies"]
    assert ensemble_leave_one_family_out(synthetic_rows()) == []
