"""The sweep's stage logic on stand-ins (one end-to-end run is test_sweep.py's quick_run): a stage
runs once and never leaves half an artifact, a killed parent takes its pool's workers with it, and a
calibrated grid runs exactly the points its calibration chose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from antidistill.experiment.calibration import chosen_grid, outside_picks
from antidistill.experiment.rundir import stage
from antidistill.experiment.sweepconfig import SweepConfig
from antidistill.io_utils import write_jsonl

from test_sweep import _session_processes


def test_a_stage_runs_once_and_a_failed_one_leaves_nothing(tmp_path):
    calls = []
    path = tmp_path / "traces.jsonl"

    def make(p):
        calls.append(p)
        write_jsonl(p, [{"a": 1}])

    assert stage(path, make) == path and stage(path, make) == path
    assert len(calls) == 1  # resumed: the finished stage is not redone

    def killed(p):  # dies half-way through its atomic write, as a SIGKILL would leave it
        with open(p.parent / f".{p.name}.x.tmp", "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    other = tmp_path / "g.safetensors"
    with pytest.raises(KeyboardInterrupt):
        stage(other, killed)
    assert not other.exists()
    calls.clear()
    stage(other, lambda p: calls.append(p) or p.write_text("whole"))
    assert calls == [other] and other.read_text() == "whole"  # the resumed run makes it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker clean-up relies on PR_SET_PDEATHSIG")
def test_pool_workers_die_with_a_killed_parent(tmp_path):
    """runtime.worker_pool, the sweep's and the world build's pool: SIGKILL the parent, no worker is left."""
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from antidistill.runtime import worker_pool

        def work(i):
            Path({str(started)!r} + str(i)).touch()
            time.sleep(600)

        if __name__ == "__main__":
            with worker_pool(2) as pool:
                list(pool.map(work, range(2)))
    """)
    (tmp_path / "pool.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "pool.py")], start_new_session=True, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not all(Path(f"{started}{i}").exists() for i in range(2)):  # both workers are inside a task
            assert proc.poll() is None, "the pool script exited early"
            time.sleep(0.1)
        assert len(_session_processes(proc.pid)) >= 3
        proc.send_signal(signal.SIGKILL)  # the parent only, as a crash or the OOM killer would
        proc.wait()
        for _ in range(3000):  # PR_SET_PDEATHSIG: the kernel kills them (the bound only guards against a hang)
            if not _session_processes(proc.pid):
                break
            time.sleep(0.1)
        assert not _session_processes(proc.pid), "worker processes outlived the killed parent"
    finally:
        for pid in _session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_calibrated_grid_runs_the_points_its_calibration_chose(tmp_path):
    cfg = SweepConfig(grid="calibrated", seeds=[0, 1], include_greedy=True, ad_lambdas=[9.0], temperatures=[9.0],
                      calibration={"arms": ["temperature", "antidistill"], "targets": [-5.0, -10.0]})
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"base_tau": 0.4, "chosen": {
        "temperature": [{"target": -5.0, "param": 0.5, "inside_measured_range": False},
                        {"target": -10.0, "param": 1.1, "inside_measured_range": True}],
        "antidistill": [{"target": -5.0, "param": 0.12, "inside_measured_range": True},
                        {"target": -10.0, "param": 0.12, "inside_measured_range": False}]}}))
    grid = chosen_grid(path)
    assert grid == {"temperature": [0.5, 1.1], "antidistill": [0.12]}  # sorted, duplicates merged
    assert outside_picks(path) == ["temperature -5 → 0.5", "antidistill -10 → 0.12"]
    points = cfg.points(grid)  # the config's own lists (9.0) never leak in
    assert points == [(m, x, s) for s in (0, 1) for m, x in
                      (("greedy", 0.0), ("temperature", 0.5), ("temperature", 1.1), ("antidistill", 0.12))]
    # the λ arms sample at the calibration's base τ; temperature points at their own τ
    assert cfg.settings_for("antidistill", 0.12, 0, tau=0.4).tau == 0.4
    assert cfg.settings_for("temperature", 1.1, 0, tau=0.4).tau == 1.1
    with pytest.raises(ValueError, match="points come from the run's calibration"):
        cfg.points()
