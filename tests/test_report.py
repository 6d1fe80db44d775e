"""The report over any results source: run directories, compact world directories, folders of them.

Fake run directories hold what a sweep writes (results, config, calibration, gate, world metrics,
FD check, student histories, a stand-in weights file), with rows from the null simulation of
``test_inference``: several independent world builds, the paired owner's-regime design.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.experiment import figures
from antidistill.experiment.gate import world_gate
from antidistill.experiment.inference import primary_effect, verdict_sentence
from antidistill.experiment.report import effect_rows, write_report
from antidistill.experiment.results_io import export_world, find_sources, load_sources, own_seed_rows, pooled_results
from antidistill.experiment.rundir import RunDir, point_name
from test_inference import simulate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _few_bootstrap_draws(monkeypatch):
    """The trade-off bands' bootstrap at 40 draws: these tests check the report, not the bands' precision."""
    monkeypatch.setattr(figures, "N_BOOT", 40)


def _fake_run(root: Path, df: pd.DataFrame, name: str, seed: int, *, gate: dict | None = None) -> Path:
    """A sweep's run directory for one world build, from its result rows."""
    files = RunDir(root / name)
    files.root.mkdir(parents=True)
    greedy = df[df.method == "temperature"].drop_duplicates("seed").assign(method="greedy", target=np.nan,
                                                                           student_acc=0.5, teacher_acc=0.9)
    df = pd.concat([greedy, df], ignore_index=True).assign(
        param=lambda d: d.groupby("method").cumcount() / 100 + 0.01,
        student_test_nll=0.5 + np.random.default_rng(seed).normal(0, 0.01, len(df) + len(greedy)),
        student_nll_result=0.6, student_nll_reasoning=0.4, student_nll_final=0.1)
    df.to_parquet(files.results)
    files.config.write_text(f"name: {name}\nworld: {{seed: {seed}}}\nsampling: {{eps: 0.01, difference: central}}\n")
    files.gate.write_text(json.dumps(gate or world_gate(df, min_slope=0.0)))  # passes unless told otherwise
    files.calibration.write_text(json.dumps({
        "n_holdout": 300, "best_undefended": 0.9, "base_tau": 0.4, "base_tau_reason": "test", "scoring": "delivered",
        "measured": {"temperature": [{"param": 0.4, "teacher_acc": 0.89}, {"param": 1.0, "teacher_acc": 0.7}]},
        "chosen": {"temperature": [{"target": -5.0, "param": 0.7, "inside_measured_range": True}]}}))
    files.world.write_text(json.dumps({"teacher_test_accuracy": 0.9}))
    files.fd_check.write_text(json.dumps({"best_eps_float32": 1e-3, "best_eps_bfloat16": 1e-2, "rows": [
        {"difference": "central", "dtype": "float32", "eps": 0.01, "mean_sine_error": 0.01, "max_sine_error": 0.02,
         "n_positions": 16}]}))
    for r in df.head(3).itertuples():
        point = files.point(r.method, r.param, r.seed)
        point.student.mkdir(parents=True)
        point.history.write_text(json.dumps([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "eval_loss": 0.7}]))
        (point.student / "model.safetensors").write_bytes(b"weights")
    return files.root


def _worlds(tmp_path: Path, k: int = 10, seed: int = 11, **kw) -> tuple[Path, pd.DataFrame]:
    """``k`` null world builds as run directories under ``tmp_path/runs``; returns the folder and all rows."""
    df = simulate(np.random.default_rng(seed), worlds=k, seeds=2, n_test=1000, sigma_world=0.02, **kw)
    for i, (w, rows) in enumerate(df.groupby("world")):
        _fake_run(tmp_path / "runs", rows.assign(world=f"toyworld-{i:02d}"), f"world{i:02d}", seed=i)
    return tmp_path / "runs", df


def _section(text: str, head: str) -> str:
    start = text.index(head)
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_report_on_null_worlds_states_the_primary_verdict(tmp_path):
    runs, _ = _worlds(tmp_path)
    text = write_report(runs).read_text()
    df = pooled_results(load_sources([runs]))
    assert df.world.nunique() == 10
    assert verdict_sentence(primary_effect(df), float(df.student_acc.max())) in text
    assert "10 world builds, t(9) interval" in text
    for section in ("## Verdict", "## Worlds", "## Effects: student accuracy", "## Transfer ladder",
                    "## Secondary endpoint: student NLL on the true solutions", "## Student NLL by token class",
                    "## Matched teacher accuracy", "## Results", "## Calibration (holdout only)",
                    "## Finite-difference check", "## What the intervals mean", "## Settings"):
        assert section in text, section
    effects = _section(text, "## Effects: student accuracy")
    for t in ("-2", "-5", "-10", "-20", "pooled over targets"):
        assert f"| antidistillation (cross-family proxy) − temperature | {t} |" in effects
    assert "| white-box − its permutation | -5 |" in effects
    assert effects.count("next world build (t(9))") == 5 * 5  # 4 arms and white-box − its permutation
    assert "All 10 world builds pass the gate." in text
    assert "| w9 | `toyworld-09` | 9 | 90.0 | 0.4 |" in text
    assert "The 10 sources' configs differ in: `name`, `world.seed`." in text
    for png in ("forest.png", "tradeoff.png", "loss_dynamics.png"):
        assert (runs / png).stat().st_size > 10_000, png


def test_replicate_seeds_add_the_own_seed_reading_and_stay_out_of_the_distiller_table(tmp_path):
    """Rows whose seed is not among their config's ``seeds`` are replicates: the verdict adds the reading on the
    sweeps' own seeds, and the distiller table (whose variants ran at the own seeds) leaves them out."""
    df = simulate(np.random.default_rng(5), worlds=4, seeds=2, n_test=1000, sigma_world=0.02)
    df = df.assign(config=json.dumps({"seeds": [0]}), distiller="naive")
    df = df[(df.seed == 0) | (df.target == -5.0)]  # seed 1 at the primary target only, as `replicate` runs it
    variant = df[(df.seed == 0) & (df.target == -5.0)].assign(distiller="correct_only")
    for i, (w, rows) in enumerate(pd.concat([df, variant]).groupby("world")):
        _fake_run(tmp_path / "runs", rows.assign(world=f"toyworld-{i:02d}"), f"world{i:02d}", seed=i)
    text = write_report(tmp_path / "runs").read_text()
    pooled = pooled_results(load_sources([tmp_path / "runs"]))
    naive = pooled[pooled.distiller == "naive"]
    own = primary_effect(naive[naive.seed == 0])
    verdict = _section(text, "## Verdict")
    assert "over its seeds at that target, replicate seeds included" in verdict
    assert (f"over the sweeps' own seeds alone, as first registered: {100 * own['estimate']:+.1f} "
            f"[{100 * own['ci_low']:+.1f}, {100 * own['ci_high']:+.1f}] points") in verdict
    assert primary_effect(naive)["estimate"] != pytest.approx(own["estimate"])
    table = _section(text, "## Adaptive distillers")
    assert "| naive | whitebox |" in table and "| 4 |" in table  # one run per world: seed 0 alone
    assert len(own_seed_rows(pooled)) == len(pooled[pooled.seed == 0])
    assert own_seed_rows(pooled.drop(columns="config")).equals(pooled.drop(columns="config"))


def test_compact_worlds_give_the_same_effects_as_run_dirs(tmp_path):
    runs, _ = _worlds(tmp_path, k=3)
    for d in find_sources(runs):
        export_world(d, tmp_path / "worlds" / d.name)
    compact = tmp_path / "worlds"
    assert [p.name for p in find_sources(compact)] == [f"world{i:02d}" for i in range(3)]
    one = compact / "world00"
    assert sorted(p.name for p in one.iterdir()) == ["calibration.json", "config.yaml", "fd_check.json", "gate.json",
                                                     "histories.json", "results.csv", "world.json"]
    assert not list(compact.rglob("*.safetensors")) and not list(compact.rglob(".*.tmp"))
    a, b = pooled_results(load_sources([runs])), pooled_results(load_sources([compact]))
    assert len(a) == len(b) and set(a.world) == set(b.world)
    for y in ("student_acc", "student_test_nll"):
        for ra, rb in zip(effect_rows(a, y), effect_rows(b, y)):
            assert (ra["key"], ra["target"]) == (rb["key"], rb["target"])
            assert rb["e"]["estimate"] == pytest.approx(ra["e"]["estimate"], abs=1e-12)
            assert rb["e"]["ci_low"] == pytest.approx(ra["e"]["ci_low"], abs=1e-12)
    ta = write_report(runs, out=tmp_path / "ra").read_text()
    tb = write_report(compact, out=tmp_path / "rb").read_text()
    for head in ("## Verdict", "## Effects: student accuracy", "## Secondary endpoint", "## Results"):
        assert _section(ta, head) == _section(tb, head), head
    # the loss histories travel with the compact world
    assert json.loads((one / "histories.json").read_text())
    # re-exporting replaces a compact world; a folder that is not one is refused and left alone
    export_world(runs / "world00", one)
    with pytest.raises(ValueError, match="not a compact world directory"):
        export_world(runs / "world00", runs / "world01")
    assert (runs / "world01" / "results.parquet").is_file()


def test_pool_mixes_kinds_and_refuses_a_world_twice(tmp_path):
    runs, _ = _worlds(tmp_path, k=3)
    dirs = find_sources(runs)
    export_world(dirs[2], tmp_path / "worlds" / "w2")
    text = write_report(dirs[0], (dirs[1], tmp_path / "worlds"), out=tmp_path / "out").read_text()
    assert "pooled over 3 world builds" in text
    with pytest.raises(ValueError, match="toyworld-02.*pool each world build once"):
        write_report(runs, (tmp_path / "worlds",), out=tmp_path / "out2")


def test_a_failing_world_is_named(tmp_path):
    df = simulate(np.random.default_rng(2), worlds=2, seeds=1)
    bad = world_gate(pd.DataFrame({"method": ["greedy", "temperature", "temperature"], "teacher_acc": [0.9, 0.8, 0.7],
                                   "student_acc": [0.3, 0.3, 0.3]}))
    for i, (w, rows) in enumerate(df.groupby("world")):
        _fake_run(tmp_path / "runs", rows.assign(world=f"w{i}"), f"world{i}", seed=i, gate=bad if i == 1 else None)
    text = write_report(tmp_path / "runs").read_text()
    assert "**1 of 2 world builds fail the gate:** w1 (greedy-trace student 30.0% < 45%" in text
    assert "| w1 | `w1` | 1 |" in text and "**fails**: greedy-trace student 30.0% < 45%" in text
    assert "interval still reaches" not in text  # its slope interval, [0, 0], excludes 0.2


def test_a_slope_that_fails_on_an_imprecise_reading_is_said_to(tmp_path):
    df = simulate(np.random.default_rng(2), worlds=2, seeds=1)
    noisy = {"greedy_ok": True, "greedy_student_acc": 0.5, "min_greedy_student": 0.45, "min_slope": 0.2,
             "n_temperature_runs": 4, "passes": False, "reason": "temperature slope 0.100 < 0.2",
             "slope_ci": [-0.5, 0.7], "slope_ok": False, "temperature_slope": 0.1}
    for i, (w, rows) in enumerate(df.groupby("world")):
        _fake_run(tmp_path / "runs", rows.assign(world=f"w{i}"), f"world{i}", seed=i, gate=noisy if i == 1 else None)
    text = write_report(tmp_path / "runs").read_text()
    assert "**1 of 2 world builds fail the gate:** w1 (temperature slope 0.100 < 0.2)" in text
    assert "The slope's 95% interval still reaches the gate's minimum in w1: there the reading cannot tell" in text


def test_worlds_are_labelled_by_seed_only_when_seeds_tell_them_apart(tmp_path):
    df = simulate(np.random.default_rng(3), worlds=2, seeds=1)
    for i, (w, rows) in enumerate(df.groupby("world")):  # two builds that both record world seed 7
        _fake_run(tmp_path / "runs", rows.assign(world=f"toyworld-{i}"), f"world{i}", seed=7)
    text = _section(write_report(tmp_path / "runs").read_text(), "## Worlds")
    assert "| W1 | `toyworld-0` | 7 |" in text and "| W2 | `toyworld-1` | 7 |" in text
    assert "| w7 |" not in text


def test_one_world_is_that_builds_estimate(tmp_path):
    runs, _ = _worlds(tmp_path, k=1)
    text = write_report(runs).read_text()
    assert "**One world build: no verdict.**" in text and "this world build only" in text


def test_one_run_of_an_outcome_without_a_sampling_variance_has_no_interval(tmp_path):
    """One world, one seed: accuracy has its binomial interval; the NLL has none, and says so."""
    df = simulate(np.random.default_rng(3), worlds=1, seeds=1, n_test=1000, sigma_world=0.0)
    _fake_run(tmp_path / "runs", df.assign(world="toyworld-00"), "world00", seed=0)
    text = write_report(tmp_path / "runs").read_text()
    secondary = next(line for line in text.splitlines() if line.startswith("Secondary endpoint"))
    assert "no interval (one run)" in secondary
    primary = _section(text, "## Effects: student accuracy")
    assert "no interval" not in primary and "[" in primary
    assert "this world build only (one run: test-set sampling only)" in primary
    assert "not the distillation seed's variation" in text.split("## Worlds")[0]


def test_an_old_results_table_without_targets_still_reports(tmp_path):
    old = tmp_path / "full"
    shutil.copytree(REPO / "docs" / "results" / "full-format2", old,
                    ignore=shutil.ignore_patterns("*.png", "*.md"))
    assert "target" not in pd.read_csv(old / "results.csv").columns
    text = write_report(old).read_text()
    df = pooled_results(load_sources([old]))
    assert df.world.nunique() == 2
    assert verdict_sentence(primary_effect(df), float(df.student_acc.max())) in text
    assert "has no calibrated targets (an older design)" in text
    assert "| antidistillation (cross-family proxy) − temperature | pooled over targets |" in text
    assert "not checked: no greedy runs" in text and (old / "forest.png").is_file()


def test_cli_report_and_export_world(tmp_path):
    runs, _ = _worlds(tmp_path, k=2)
    runner = CliRunner()
    d0, d1 = find_sources(runs)
    res = runner.invoke(app, ["export-world", str(d0), str(tmp_path / "worlds" / "a")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(tmp_path / "worlds"), "--pool", str(d1), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "pooled over 2 world builds" in (tmp_path / "rep" / "report.md").read_text()
    missing = tmp_path / "nowhere"
    for args in (["report", str(runs), "--pool", str(missing)], ["export-world", str(missing), str(tmp_path / "x")],
                 ["report", str(tmp_path / "rep")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert str(args[-1] if args[0] == "report" else missing) in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_point_names_map_histories_to_arms(tmp_path):
    runs, _ = _worlds(tmp_path, k=1)
    (src,) = load_sources([runs])
    assert all(name.rsplit("_", 2)[0] in {"greedy", "temperature"} for name in src.histories)
    assert point_name("whitebox_permutation", 0.01, 0).rsplit("_", 2)[0] == "whitebox_permutation"


def test_an_arm_with_few_runs_gets_a_line_but_no_band():
    import numpy as np

    from antidistill.experiment.figures import MAX_GAP, MIN_RUNS_FOR_BAND, lowess_band, lowess_line

    x = np.array([0.62, 0.70, 0.78, 0.86, 0.63, 0.71, 0.79, 0.87])
    y = np.array([0.40, 0.42, 0.45, 0.47, 0.38, 0.44, 0.43, 0.50])
    grid = np.linspace(0.6, 0.9, 31)
    assert len(x) < MIN_RUNS_FOR_BAND and lowess_band(x, y, grid) is None
    line = lowess_line(x, y, grid)
    near = (np.abs(grid[:, None] - x[None, :]).min(1) <= MAX_GAP) & (grid >= x.min()) & (grid <= x.max())
    assert near.sum() > 10 and np.isfinite(line[near]).all() and np.isnan(line[~near]).all()
    many = lowess_band(np.tile(x, 2), np.tile(y, 2), grid)
    assert many is not None and np.nanmax(many[2] - many[1]) < 0.3


def test_one_temperature_run_per_world_is_said_to_leave_the_mismatch_unadjusted():
    """The transfer design's one target: no slope to adjust a paired difference by, and the report says so."""
    from antidistill.experiment.report import _adjustment

    two = pd.DataFrame({"method": ["temperature"] * 3, "world": ["a", "a", "b"], "teacher_acc": [0.9, 0.8, 0.85]})
    assert _adjustment(two).startswith("adjusted by the world's temperature slope")
    one = two.assign(teacher_acc=[0.9, 0.9, 0.85])
    assert _adjustment(one, "remaining").startswith("not adjusted for the remaining mismatch (one temperature run")


def test_world_folders_are_found_in_natural_order(tmp_path):
    for name in ("w10", "w2", "w1", "b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text("method\n")
    assert [p.name for p in find_sources(tmp_path)] == ["a", "b", "w1", "w2", "w10"]
