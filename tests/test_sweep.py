"""The experiment end to end on the quick toy world: results, report, plots, resumability, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from antidistill.config import load_config
from antidistill.experiment.calibration import Design
from antidistill.experiment.sweep import Run, SweepConfig

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"


def quick_cfg(tmp: Path, name="quick", **over) -> SweepConfig:
    sets = [f"runs_dir={tmp / 'runs'}", f"cache_dir={tmp / 'cache'}", f"name={name}"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(SweepConfig, QUICK, sets)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = quick_cfg(tmp)
    t0 = time.time()
    out = Run(cfg, progress=False).run()
    return tmp, cfg, out, time.time() - t0


def test_quick_demo_writes_everything(quick_run):
    tmp, cfg, out, seconds = quick_run
    df = pd.read_parquet(out / "results.parquet")
    design = Design.load(out / "calibration.json")
    assert set(df.method) == {"greedy", "temperature", "antidistill", "whitebox", "whitebox_permutation"}
    assert len(df) == 1 + sum(len(v) for v in design.grid.values())
    # the owner's-regime design: every non-greedy run carries its target; λ arms sample at the base τ
    assert set(df[df.method != "greedy"].target) <= {-5.0, -20.0} and df[df.method == "greedy"].target.isna().all()
    assert (df[df.method.isin(["antidistill", "whitebox", "whitebox_permutation"])].tau == design.base_tau).all()
    assert (df.teacher_eval == "traces").all() and (df.n_teacher == df.n_traces).all()
    gate = json.loads((out / "gate.json").read_text())
    assert set(gate) >= {"greedy_student_acc", "temperature_slope", "passes"}
    for col in ("teacher_acc", "student_acc", "student_test_nll", "teacher_ci_low", "config", "torch_version",
                "student_nll_result", "student_nll_reasoning", "student_nll_final", "teacher_forced_frac", "world",
                "transformers_version", "antidistill_version", "settings"):
        assert col in df.columns
    assert df.teacher_acc.between(0, 1).all() and df.student_acc.between(0, 1).all()
    assert json.loads(df.config.iloc[0])["name"] == "quick"
    for f in ("report.md", "tradeoff.png", "forest.png", "loss_dynamics.png", "fd_error.png", "proxy_grad.safetensors",
              "student_grad.safetensors",
              "config.yaml", "holdout_traces.jsonl"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    for section in ("## Verdict", "## Transfer ladder", "## Matched teacher accuracy", "## Student NLL by token class",
                    "## Results", "## Finite-difference check", "## Settings"):
        assert section in report
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
    # the loss-dynamics record: train loss and clean-holdout loss over steps
    ad = df[df.method == "antidistill"].param.iloc[0]
    hist = json.loads((out / "points" / f"antidistill_{ad:g}_s0" / "student" / "history.json").read_text())
    assert any("eval_loss" in h for h in hist) and any("loss" in h for h in hist)


def test_second_run_does_nothing_twice(quick_run):
    tmp, cfg, out, _ = quick_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "report.md"}
    Run(cfg, progress=False).run()
    for p, t in stamps.items():
        if p.suffix not in (".png", ".parquet"):
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"


@pytest.mark.slow  # stage logic on stand-ins: test_sweep_stages.py
def test_sigkill_then_resume_gives_the_same_results(quick_run):
    tmp, cfg, out, seconds = quick_run
    name = "killed"
    cmd = [sys.executable, "-m", "antidistill.cli", "sweep", "--config", str(QUICK), "--set", f"runs_dir={tmp / 'runs'}",
           "--set", f"cache_dir={tmp / 'cache'}", "--set", f"name={name}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run_dir = tmp / "runs" / name
    for delay in (8.0, 15.0):  # the world is cached, so these land inside the sweep stages
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".tmp" not in p.name}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for p, t in before.items():
        if p.exists() and p.suffix in (".jsonl", ".json", ".safetensors") and "points" in p.parts:
            assert p.stat().st_mtime_ns == t, f"finished stage {p} was redone"
    a = pd.read_parquet(out / "results.parquet").sort_values(["method", "param", "seed"]).reset_index(drop=True)
    b = pd.read_parquet(run_dir / "results.parquet").sort_values(["method", "param", "seed"]).reset_index(drop=True)
    cols = ["method", "param", "seed", "teacher_acc", "student_acc", "trace_acc"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def _session_processes(sid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in session ``sid``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
                pids.append(int(d.name))
    return pids


@pytest.mark.slow  # worker clean-up on a stand-in pool: test_sweep_stages.py
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker clean-up relies on PR_SET_PDEATHSIG")
def test_parallel_workers_die_with_a_killed_sweep_and_resume_gives_the_same_results(quick_run):
    tmp, cfg, out, seconds = quick_run
    name = "parallel"
    cmd = [sys.executable, "-m", "antidistill.cli", "sweep", "--config", str(QUICK), "--set", f"runs_dir={tmp / 'runs'}",
           "--set", f"cache_dir={tmp / 'cache'}", "--set", f"name={name}", "--set", "workers=2"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(_session_processes(proc.pid)) < 3 and time.time() < deadline:  # the sweep and its two workers
        time.sleep(0.2)
    assert len(_session_processes(proc.pid)) >= 3, "the workers never started"
    time.sleep(3.0)
    proc.send_signal(signal.SIGKILL)  # the parent only, as a crash or the OOM killer would
    proc.wait()
    deadline = time.time() + 10
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _session_processes(proc.pid), "worker processes outlived the killed sweep"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp / "runs" / name
    a = pd.read_parquet(out / "results.parquet")
    b = pd.read_parquet(run_dir / "results.parquet")
    cols = ["method", "param", "seed", "teacher_acc", "student_acc", "trace_acc"]
    # rows in the serial run's point order (baseline points first, then the calibrated arms)
    assert list(b[["method", "param", "seed"]].itertuples(index=False)) == \
        list(a[["method", "param", "seed"]].itertuples(index=False))
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_parallel_world_build_equals_the_serial_one(quick_run, tmp_path):
    """Each worker trains its own role with its own data and seed: the same world, up to the last bits
    that another torch thread count can change."""
    from safetensors.torch import load_file

    from antidistill.toyworld.build import build_world

    tmp, cfg, out, _ = quick_run
    serial = build_world(cfg.world, cfg.cache_dir, progress=False)
    parallel = build_world(cfg.world, tmp_path, progress=False, workers=2)
    assert parallel.root.name == serial.root.name and parallel.metrics["build_workers"] == 2
    for f in ("data/train.jsonl", "data/holdout.jsonl", "data/test.jsonl", "tokenizer/tokenizer.json"):
        assert (parallel.root / f).read_bytes() == (serial.root / f).read_bytes(), f
    for role in ("teacher", "proxy", "student"):
        a = load_file(parallel.root / role / "model.safetensors")
        b = load_file(serial.root / role / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max() < 1e-4, (role, k)
        assert parallel.metrics[f"{role}_final_train_loss"] == pytest.approx(
            serial.metrics[f"{role}_final_train_loss"], rel=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_calibration_is_the_first_stage_and_holdout_only(quick_run):
    """grid=calibrated: calibration.json measured greedy, temperature and each λ arm on the holdout only,
    chose each arm's parameter per target, and the run's points are exactly those."""
    tmp, cfg, out, _ = quick_run
    info = json.loads((out / "calibration.json").read_text())
    assert info["split"] == "holdout" and 0 < info["n_holdout"] <= 32 and info["best_from"] == "greedy"
    assert set(info["measured"]) == {"greedy", "temperature", "antidistill", "whitebox", "whitebox_permutation"}
    for arm, picks in info["chosen"].items():
        assert [c["target"] for c in picks] == [-5.0, -20.0], arm
    df = pd.read_parquet(out / "results.parquet")
    grid = Design.load(out / "calibration.json").grid
    assert sorted(zip(df[df.method != "greedy"].method, df[df.method != "greedy"].param)) == \
        sorted((arm, x) for arm, xs in grid.items() for x in xs)
    with pytest.raises(ValueError, match="points come from the run's calibration"):
        cfg.points()


def test_replicate_seeds_rerun_the_targets_points_naive_only_and_leave_the_gate_alone(quick_run, tmp_path):
    """A run grown with ``replicate`` (and an adaptive distiller at the same target) adds one point per arm at
    the target for each replicate seed, each the naive distiller into the base student only; the gate, the
    distiller's per-seed artifacts and its rows stay with the sweep's own seed."""
    import shutil

    src_tmp, _, out, _ = quick_run
    copy = tmp_path / "runs" / "quick"
    shutil.copytree(out, copy)
    config = copy / "config.yaml"  # the copy's config names its own runs_dir
    config.write_text(config.read_text().replace(str(src_tmp / "runs"), str(tmp_path / "runs")))
    gate = (copy / "gate.json").read_text()
    over = {"cache_dir": src_tmp / "cache", "replicate": "{targets: [-5.0], seeds: [7]}",
            "distillers": "[naive, {kind: warm_start, n_clean: 4}]", "distill_at.targets": "[-5.0]"}
    grown = Run(quick_cfg(tmp_path, **over), progress=False).run()
    df = pd.read_parquet(grown / "results.parquet")
    design = Design.load(grown / "calibration.json")
    at_primary = sorted(k for k, t in design.targets.items() if t == -5.0)
    rep = df[df.seed == 7]
    assert sorted(zip(rep.method, rep.param)) == at_primary and (rep.distiller == "naive").all()
    assert (rep.target == -5.0).all() and len(rep) == len(at_primary)
    adaptive = df[df.distiller == "warm_start"]
    assert sorted(zip(adaptive.method, adaptive.param)) == at_primary and (adaptive.seed == 0).all()
    assert (grown / "gate.json").read_text() == gate
    assert not list((grown / "points").glob("*_s7/distillers"))
    assert sorted(p.name for p in (grown / "distillers" / "warm_start").iterdir()) == ["settings.json", "student_s0"]
    assert "replicate:" in (grown / "config.yaml").read_text()


def test_replicate_is_validated():
    from antidistill.experiment.sweepconfig import Replicates

    for over, needle in [({"replicate": "{targets: [-5.0]}"}, "needs both targets and seeds"),
                         ({"replicate": "{targets: [-5.0], seeds: [0]}"}, r"replicate.seeds \[0\] are already"),
                         ({"replicate": "{targets: [-7.0], seeds: [1]}"}, "not among calibration.targets"),
                         ({"replicate": "{targets: [-5.0], seeds: [1]}", "grid": "config"}, "needs grid='calibrated'"),
                         ({"replicate": "{targets: [-5.0], seeds: [1, 1]}"}, "more than once")]:
        with pytest.raises(ValueError, match=needle):
            quick_cfg(Path("/nonexistent"), **over)
    targets = {("temperature", 0.3): -5.0, ("antidistill", 0.01): -20.0, ("whitebox", 0.02): -5.0}
    assert Replicates(targets=[-5.0], seeds=[1, 2]).points(targets) == [
        ("temperature", 0.3, 1), ("whitebox", 0.02, 1), ("temperature", 0.3, 2), ("whitebox", 0.02, 2)]


def test_config_mismatch_on_resume_is_an_error(quick_run):
    tmp, cfg, out, _ = quick_run
    other = quick_cfg(tmp, **{"sampling.eps": 0.5})
    with pytest.raises(ValueError, match="holds a different config"):
        Run(other, progress=False)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"dataset": "gsm9k"}, "dataset must be 'toy' or one of"),
        ({"ad_lambdas": "[.nan]"}, "lam=nan"),
        ({"temperatures": "[0]"}, "tau=0.0"),
        ({"seeds": "[]"}, "seeds must list"),
        ({"sampling.difference": "sideways"}, "difference='sideways'"),
        ({"workers": "0"}, "workers=0"),
        ({"arms": "{blackbox: [0.1]}"}, "unknown arms"),
        ({"grid": "guess"}, "grid"),
        ({"calibration.arms": "[antidistill]"}, "must include temperature"),
        ({"calibration.arms": "[temperature, greedy]"}, "unknown arms"),
        ({"calibration.targets": "[1.2]"}, "points below"),
        ({"calibration.temperatures": "[0.0, 1.0]"}, "tau=0.0"),
        ({"calibration.n_holdout": "0"}, "n_holdout must be"),
        ({"world.n_holdout": "500"}, "n_holdout"),
        ({"world.format": "1"}, "format"),
    ],
)
def test_bad_config_is_rejected_before_anything_is_written(tmp_path, over, needle):
    with pytest.raises(ValueError, match=needle):
        quick_cfg(tmp_path, **over)
    assert not (tmp_path / "runs").exists()


def test_unknown_method_and_missing_model_path(tmp_path):
    cfg = quick_cfg(tmp_path)
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        cfg.settings_for("beam", 1.0, 0)
    bad = quick_cfg(tmp_path, name="bad", dataset="gsm8k", data_path=str(tmp_path), teacher="./no/such/model",
                    proxy="./no/such/model", student="./no/such/model")
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 3"}\n' * 10)
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "a #### 3"}\n')
    with pytest.raises(ValueError, match="teacher model path './no/such/model' does not exist"):
        Run(bad, progress=False)
    assert not (tmp_path / "runs" / "bad").exists()


def test_unknown_config_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lamdas'"):
        quick_cfg(tmp_path, lamdas="[1]")
