"""A sweep with two distillers on the quick toy world: one row per distiller, the naive path unchanged, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from antidistill.config import load_config
from antidistill.experiment.sweep import Run, SweepConfig

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"
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
