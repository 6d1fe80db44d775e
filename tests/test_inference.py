"""The pooled inference under the null: a simulation of the demo's design with no method effect.

Each simulated dataset is a whole sweep: every seed runs every method at every grid point; the
teacher accuracy of a run is a binomial draw around its grid level, and the student accuracy is
one smooth (curved) function of the teacher accuracy for *every* method, plus a seed effect shared
by the runs of a seed, run-to-run noise and binomial test noise (about 4.5 points run SD, as
measured). The verdict sentence claims an effect when the pooled 95% CI excludes zero; the test
counts how often it does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from antidistill.experiment.inference import (
    ladder_effects,
    ladder_reading,
    pooled_effect,
    verdict_sentence,
)

# teacher-accuracy levels of the demo's grids (delivered-trace scoring)
LEVELS = {"temperature": [0.86, 0.78, 0.68, 0.53], "antidistill": [0.82, 0.72, 0.60, 0.45],
          "permutation": [0.80, 0.62], "reasoning_only": [0.80, 0.65], "whitebox": [0.80, 0.62],
          "whitebox_permutation": [0.80, 0.62]}


def simulate(rng: np.random.Generator, seeds: int, n_test: int, effect: dict[str, float] | None = None,
             worlds: int = 1) -> pd.DataFrame:
    effect = effect or {}
    rows = []
    for w in range(worlds):
        world_shift = rng.normal(0, 0.03)
        for s in range(seeds):
            seed_shift = rng.normal(0, 0.02)
            for m, levels in LEVELS.items():
                for lv in levels:
                    t = rng.binomial(n_test, np.clip(lv + rng.normal(0, 0.02), 0, 1)) / n_test
                    p = 0.15 + 0.55 * t**2 + world_shift + seed_shift + effect.get(m, 0.0) + rng.normal(0, 0.03)
                    rows.append({"method": m, "param": lv, "seed": s, "world": w, "teacher_acc": t,
                                 "student_acc": rng.binomial(n_test, np.clip(p, 0.01, 0.99)) / n_test})
    return pd.DataFrame(rows)


def false_positive_rate(n_sims: int, seeds: int, n_test: int, n_boot: int, worlds: int = 1) -> float:
    rng = np.random.default_rng(12345)
    hits = 0
    for _ in range(n_sims):
        e = pooled_effect(simulate(rng, seeds, n_test, worlds=worlds), "antidistill", n_boot=n_boot)
        hits += not verdict_sentence(e).startswith("**Not shown.**")
    return hits / n_sims


@pytest.mark.parametrize("seeds", [2, 3])
def test_null_false_positive_rate_of_the_verdict(seeds):
    assert false_positive_rate(n_sims=400, seeds=seeds, n_test=200, n_boot=100) <= 0.07


@pytest.mark.slow
@pytest.mark.parametrize("seeds, worlds", [(2, 1), (4, 1), (5, 2)])
def test_null_false_positive_rate_large(seeds, worlds):
    assert false_positive_rate(n_sims=2000, seeds=seeds, n_test=1000, n_boot=300, worlds=worlds) <= 0.07


def test_a_real_effect_is_found():
    rng = np.random.default_rng(7)
    found = sum(verdict_sentence(pooled_effect(simulate(rng, 3, 1000, {"antidistill": -0.10}), "antidistill",
                                               n_boot=100)).startswith("**The claim holds")
                for _ in range(40))
    assert found >= 30


def test_ladder_reading_cases():
    rng = np.random.default_rng(3)
    works_not_transfer = simulate(rng, 4, 2000, {"whitebox": -0.15})
    assert ladder_reading(ladder_effects(works_not_transfer, n_boot=100)).startswith("**The mechanism works but")
    noise = simulate(rng, 4, 2000, {"whitebox": -0.15, "whitebox_permutation": -0.15})
    assert ladder_reading(ladder_effects(noise, n_boot=100)).startswith("**The damage is noise")


def test_no_overlap_gives_no_verdict():
    df = pd.DataFrame({"method": ["temperature"] * 3 + ["antidistill"] * 3, "seed": [0] * 6, "param": range(6),
                       "teacher_acc": [0.9, 0.85, 0.8, 0.3, 0.2, 0.1], "student_acc": [0.5] * 6})
    assert pooled_effect(df, "antidistill") is None
    assert "no verdict" in verdict_sentence(None)


def _fake_run(root, df: pd.DataFrame, name: str):
    from antidistill.experiment.rundir import RunDir

    files = RunDir(root / name)
    files.root.mkdir(parents=True)
    df = df.assign(student_test_nll=0.5, n_test=200, student_nll_result=0.6, student_nll_reasoning=0.4,
                   student_nll_final=0.1)
    df.to_parquet(files.results)
    files.config.write_text(f"name: {name}\nsampling: {{eps: 0.01, difference: central}}\n")
    return files.root


def test_report_on_null_data_uses_the_pooled_verdict(tmp_path):
    """The report itself, fed null data from two world builds: its verdict is the pooled estimate's."""
    rng = np.random.default_rng(11)
    a = _fake_run(tmp_path, simulate(rng, 3, 200), "w0")
    b = _fake_run(tmp_path, simulate(rng, 3, 200).assign(world=1), "w1")
    from antidistill.experiment.report import write_report

    text = write_report(a, (b,)).read_text()
    df = pd.concat([pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet")])
    assert verdict_sentence(pooled_effect(df, "antidistill"), float(df.student_acc.max())) in text
    assert "6 seed clusters" in text
    for section in ("## Transfer ladder", "Reading: ", "## Student NLL by token class", "## Matched teacher accuracy"):
        assert section in text
