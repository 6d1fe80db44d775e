"""A sweep with two distillers on the quick toy world: one row per distiller, the naive path unchanged, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from antidistill.config import load_config
from antidistill.experiment.sweep import Run, SweepConfig

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"
FULL = QUICK.with_name("full.yaml")
ONE_POINT = ["grid=config", "include_greedy=false", "gate=skip", "teacher_eval=test", "temperatures=[1.0]", "ad_lambdas=[]",
             "perm_lambdas=[]", "arms={}", "seeds=[0]"]


def _cfg(tmp: Path, name: str, *extra: str) -> SweepConfig:
    sets = [f"runs_dir={tmp / 'runs'}", f"cache_dir={tmp / 'cache'}", f"name={name}", *ONE_POINT, *extra]
    return load_config(SweepConfig, QUICK, sets)


@pytest.fixture(scope="module")
def two_distillers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distillers")
    cfg = _cfg(tmp, "two", "distillers=[naive, correct_only]")
    return tmp, cfg, Run(cfg, progress=False).run()


def test_each_point_is_distilled_once_per_distiller_and_rows_carry_the_column(two_distillers):
    tmp, cfg, out = two_distillers
    df = pd.read_parquet(out / "results.parquet")
    assert df[["method", "param", "seed", "distiller"]].values.tolist() == [
        ["temperature", 1.0, 0, "naive"], ["temperature", 1.0, 0, "correct_only"]]
    point = out / "points" / "temperature_1_s0"
    naive = json.loads((point / "result.json").read_text())
    assert "distiller" not in naive  # the naive point's files are what they always were
    adaptive = point / "distillers" / "correct_only"
    train = [json.loads(line) for line in (adaptive / "train.jsonl").read_text().splitlines()]
    traces = [json.loads(line) for line in (point / "traces.jsonl").read_text().splitlines()]
    assert train == [t for t in traces if t["correct"]]
    row = json.loads((adaptive / "result.json").read_text())
    assert row["distiller"] == "correct_only" and row["n_train"] == len(train)
    assert row["teacher_acc"] == naive["teacher_acc"]  # one teacher, two distillers
    assert (adaptive / "student" / "history.json").is_file() and (adaptive / "student_test.jsonl").is_file()
    assert "distillers:" in (out / "config.yaml").read_text()


def test_resume_redoes_nothing(two_distillers):
    tmp, cfg, out = two_distillers
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    Run(cfg, progress=False).run()
    for p, t in stamps.items():
        if p.suffix not in (".png", ".parquet", ".md"):
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    df = pd.read_parquet(out / "results.parquet")
    assert df.distiller.tolist() == ["naive", "correct_only"]


@pytest.mark.slow  # a second sweep of the same point
def test_the_naive_path_matches_a_naive_only_run(two_distillers):
    tmp, cfg, out = two_distillers
    alone = Run(_cfg(tmp, "naive_only"), progress=False).run()  # the config as it was before distillers
    assert "distillers:" not in (alone / "config.yaml").read_text()
    for f in ("traces.jsonl", "teacher_test.jsonl", "student_test.jsonl", "result.json", "student/history.json"):
        a, b = out / "points" / "temperature_1_s0" / f, alone / "points" / "temperature_1_s0" / f
        assert a.read_bytes() == b.read_bytes(), f
    df = pd.read_parquet(alone / "results.parquet")
    assert df.distiller.tolist() == ["naive"]


def test_a_run_gains_distillers_on_resume_only_where_distill_at_covers(two_distillers):
    """A naive-only run resumed with an adaptive distiller scoped to one arm: the naive stages stay as they
    were, the new rows appear at that arm's points only, and any other change is still refused."""
    tmp, _, _ = two_distillers
    grid = ["ad_lambdas=[0.003]"]
    naive = _cfg(tmp, "grow", *grid)
    out = Run(naive, progress=False).run()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "points").rglob("*") if p.is_file()}
    grown = _cfg(tmp, "grow", *grid, "distillers=[naive, correct_only]", "distill_at.arms=[temperature]")
    Run(grown, progress=False).run()
    for p, t in stamps.items():
        assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(map(tuple, df[["method", "distiller"]].values.tolist())) == [
        ("antidistill", "naive"), ("temperature", "correct_only"), ("temperature", "naive")]
    assert not (out / "points" / "antidistill_0.003_s0" / "distillers").exists()
    assert "distill_at:" in (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match="holds a different config"):
        Run(_cfg(tmp, "grow", "ad_lambdas=[0.004]", "distillers=[naive, correct_only]"), progress=False)


def test_distill_at_is_validated(tmp_path):
    with pytest.raises(ValueError, match="add naive"):
        _cfg(tmp_path, "x", "distillers=[correct_only]", "distill_at.arms=[temperature]")
    with pytest.raises(ValueError, match=r"distill_at.arms \['tempreature'\] run at no point"):
        _cfg(tmp_path, "x", "distillers=[naive, correct_only]", "distill_at.arms=[tempreature]")
    with pytest.raises(ValueError, match=r"distill_at.arms \['antidistill'\] run at no point"):  # ad_lambdas=[]
        _cfg(tmp_path, "x", "distillers=[naive, correct_only]", "distill_at.arms=[antidistill]")
    with pytest.raises(ValueError, match="needs grid='calibrated'"):
        _cfg(tmp_path, "x", "distillers=[naive, correct_only]", "distill_at.targets=[-5]")
    with pytest.raises(ValueError, match="distill_at.targets must list"):
        _cfg(tmp_path, "x", "distillers=[naive, correct_only]", "distill_at.targets=[]")
    full = FULL.read_text()
    assert load_config(SweepConfig, FULL).distill_at.targets == [-5.0]
    for bad, needle in [("distill_at.targets=[-7.0]", "not among calibration.targets"),
                        ("distill_at.arms=[permutation]", "run at no point"),
                        ("distill_at.arms=[greedy]", "run at no point")]:
        with pytest.raises(ValueError, match=needle):
            load_config(SweepConfig, FULL, [bad])
    assert "distill_at:" in full


def test_a_calibrated_point_is_in_scope_by_the_target_its_rows_carry(tmp_path):
    """A value serving two targets carries the primary one (−5) when it is among them, so its rows pair at −5
    and the adaptive distillers that run there are the ones the −5 table reads."""
    from antidistill.experiment.calibration import Design
    from antidistill.experiment.distillers import DistillerScope

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"base_tau": 0.3, "chosen": {
        "temperature": [{"target": -2.0, "param": 0.3}, {"target": -5.0, "param": 0.3}, {"target": -10.0, "param": 0.7}],
        "whitebox": [{"target": -5.0, "param": 0.01}, {"target": -10.0, "param": 0.02}],
        "antidistill": [{"target": -10.0, "param": 0.05}, {"target": -20.0, "param": 0.05}]}}))
    design = Design.load(path)
    assert design.targets[("temperature", 0.3)] == -5.0  # serves −2 and −5: the primary one
    assert design.targets[("antidistill", 0.05)] == -10.0  # serves −10 and −20: the first
    scope = DistillerScope(targets=[-5.0], arms=["temperature", "whitebox"])
    covered = sorted(k for k, t in design.targets.items() if scope.covers(k[0], t))
    assert covered == [("temperature", 0.3), ("whitebox", 0.01)]
    assert not scope.covers("greedy", None) and DistillerScope().covers("greedy", None)


def test_a_distiller_keeps_its_settings_across_resumes(tmp_path):
    """Its stages are keyed by its kind: a resume that changes a distiller's settings is refused, and so is
    one that brings back a dropped distiller with other settings."""
    from antidistill.experiment.sweepconfig import config_text, same_but_distillers

    base = _cfg(tmp_path, "keep", "distillers=[naive, {kind: clean_mix, fraction: 0.1}]")
    other = _cfg(tmp_path, "keep", "distillers=[naive, {kind: clean_mix, fraction: 0.5}]")
    grown = _cfg(tmp_path, "keep", "distillers=[naive, {kind: clean_mix, fraction: 0.1}, correct_only]")
    assert same_but_distillers(config_text(base), config_text(grown))
    assert not same_but_distillers(config_text(base), config_text(other))

    from antidistill.experiment.distiller_stages import check_distiller_settings
    from antidistill.experiment.rundir import RunDir

    files = RunDir(tmp_path / "runs" / "keep")
    check_distiller_settings(files, base.distillers, write=True)
    assert (files.distiller("clean_mix") / "settings.json").is_file()
    check_distiller_settings(files, grown.distillers, write=False)  # same settings: fine
    with pytest.raises(ValueError, match="records other settings for distiller 'clean_mix'"):
        check_distiller_settings(files, other.distillers, write=False)


def test_a_world_that_fails_the_gate_runs_no_adaptive_distiller(two_distillers):
    """The gate reads the base student's naive rows; a world that fails it (gate: stop) ends there, so no
    variant is distilled, not even at the temperature points the gate ran."""
    tmp, _, _ = two_distillers
    cfg = _cfg(tmp, "gated", "gate=stop", "distillers=[naive, correct_only]")
    with pytest.warns(RuntimeWarning, match="fails the gate"):
        out = Run(cfg, progress=False).run()
    assert not json.loads((out / "gate.json").read_text())["passes"]
    assert not list((out / "points").rglob("distillers"))  # the run records the settings only: distillers/<kind>/settings.json
    assert [p.name for p in (out / "distillers").rglob("*") if p.is_file()] == ["settings.json"]
    assert pd.read_parquet(out / "results.parquet").distiller.tolist() == ["naive"]
