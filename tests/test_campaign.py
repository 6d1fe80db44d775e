"""`--full` in parts: world seeds, and the demo command's flags (no model is built)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.config import load_config
from antidistill.experiment.campaign import parse_world_seeds
from antidistill.experiment.results_io import recorded_gate
from antidistill.experiment.gate import gate_on_record
from antidistill.experiment.sweep import Run, SweepConfig


@pytest.mark.parametrize("spec, seeds", [("0", [0]), ("0-2", [0, 1, 2]), ("3,5, 7", [3, 5, 7]), ("1-2,9", [1, 2, 9])])
def test_world_seeds(spec, seeds):
    assert parse_world_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["", "a", "2-x", "1,1", "-1", "0-1,1"])
def test_bad_world_seeds_are_refused(spec):
    with pytest.raises(ValueError, match="--worlds"):
        parse_world_seeds(spec)


@pytest.mark.parametrize("args, match", [(["--quick", "--full"], "exclude each other"),
                                         (["--worlds", "0-3"], "go with --full"),
                                         (["--full", "--worlds", "x"], "--worlds"),
                                         (["--config", "x.yaml"], "go with --full")])
def test_demo_flags_are_checked_before_any_work(args, match):
    r = CliRunner().invoke(app, ["demo", *args])
    assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output


# --- a gate read from another design's record of the same world build (gate_from) --------------------------------

REPO = Path(__file__).resolve().parents[1]
FULL_WORLDS = REPO / "docs/results/full/worlds"
TRANSFER = REPO / "src/antidistill/configs/transfer.yaml"


def _transfer(seed: int, *overrides: str) -> SweepConfig:
    return load_config(SweepConfig, TRANSFER, [f"world.seed={seed}", f"gate_from={FULL_WORLDS}", *overrides])


def test_the_transfer_design_reads_full_s_gate_of_the_same_world_build():
    """transfer.yaml's worlds are full.yaml's (same key, the zoo aside): its gate is the one --full recorded."""
    gate, path = recorded_gate(FULL_WORLDS, _transfer(4).world)
    assert path == FULL_WORLDS / "w4"
    assert gate == json.loads((FULL_WORLDS / "w4/gate.json").read_text()) and gate["passes"]
    failing, path = recorded_gate(FULL_WORLDS, _transfer(2).world)
    assert path == FULL_WORLDS / "w2" and not failing["passes"]
    assert gate_on_record(_transfer(4)) == (gate, str(FULL_WORLDS / "w4"))
    assert gate_on_record(_transfer(4, "gate_from=null")) is None


def test_a_world_without_a_passing_recorded_gate_stops_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="fails the gate recorded in .*w2"):
        gate_on_record(_transfer(2))
    assert gate_on_record(_transfer(2, "gate=warn"))[0]["passes"] is False  # "warn" goes on
    with pytest.raises(ValueError, match="no run or world directory there builds world seed 999"):
        gate_on_record(_transfer(999))
    with pytest.raises(ValueError, match="fails the gate recorded"):  # Run refuses before it builds or writes
        Run(_transfer(2, f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_demo_full_checks_every_recorded_gate_before_the_first_world(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--full", "--config", str(TRANSFER), "--worlds", "4,2",
                                 "--export-to", str(tmp_path / "worlds"), "--set", f"gate_from={FULL_WORLDS}",
                                 "--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"cache_dir={tmp_path / 'c'}"])
    assert r.exit_code == 2 and "world seed 2 fails the gate" in r.output and "Traceback" not in r.output
    assert not any(tmp_path.iterdir())


def test_two_records_of_one_world_must_agree_and_gate_from_needs_a_gate(tmp_path):
    for name in ("a", "b"):
        shutil.copytree(FULL_WORLDS / "w4", tmp_path / name)
    assert recorded_gate(tmp_path, _transfer(4).world)[1] == tmp_path / "a"
    gate = json.loads((tmp_path / "b/gate.json").read_text())
    (tmp_path / "b/gate.json").write_text(json.dumps(gate | {"passes": False}))
    with pytest.raises(ValueError, match="different gates"):
        recorded_gate(tmp_path, _transfer(4).world)
    with pytest.raises(ValueError, match="gate_from .* needs gate 'stop' or 'warn'"):
        _transfer(4, "gate=skip")


def test_a_config_without_gate_from_keeps_its_committed_text_so_its_run_resumes():
    """config.yaml is compared on resume: a new setting left at its default must not change the text."""
    from antidistill.experiment.sweepconfig import config_text

    cfg = load_config(SweepConfig, REPO / "src/antidistill/configs/full.yaml", ["world.seed=4", "name=full-w4"])
    assert config_text(cfg) == (FULL_WORLDS / "w4/config.yaml").read_text()
    assert "gate_from: " in config_text(_transfer(4))


def test_only_the_same_world_build_s_gate_is_read(tmp_path):
    """Matched by the world's key, not its seed: the same seed built otherwise, or a non-toy run, is not it."""
    import yaml

    for name, change in [("other-build", {"world": {"n_test": 100}}), ("gsm8k", {"dataset": "gsm8k"})]:
        shutil.copytree(FULL_WORLDS / "w4", tmp_path / name)
        cfg = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        cfg["world"] |= change.get("world", {})
        cfg |= {k: v for k, v in change.items() if k != "world"}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(ValueError, match="gate_from=.*no run or world directory there builds world seed 4"):
        gate_on_record(_transfer(4, f"gate_from={tmp_path}"))
    shutil.copytree(FULL_WORLDS / "w4", tmp_path / "same-build")
    assert gate_on_record(_transfer(4, f"gate_from={tmp_path}"))[1] == str(tmp_path / "same-build")


def test_a_recorded_gate_judged_by_other_thresholds_is_refused():
    with pytest.raises(ValueError, match="judged with .*'min_slope': 0.2.* asks for .*'min_slope': 0.3"):
        gate_on_record(_transfer(4, "gate_min_slope=0.3"))


class _GateOnly(Run):
    """A Run with just what its gate step reads: the config, the run directory and the recorded gate."""

    def __init__(self, cfg, root):
        from antidistill.experiment.rundir import RunDir

        self.cfg, self.files, self.worker = cfg, RunDir(root), False
        self.gate_record = gate_on_record(cfg)
        root.mkdir(parents=True, exist_ok=True)

    def _run_points(self, points, gate_only=False):
        raise AssertionError("a recorded gate is read, not measured")


def test_run_reads_the_recorded_gate_measures_nothing_and_keeps_only_that_record(tmp_path):
    run = _GateOnly(_transfer(4), tmp_path / "run")
    gate, naive = run.world_gate([("greedy", 0.0, 0), ("temperature", 0.5, 0)])
    recorded = json.loads((FULL_WORLDS / "w4/gate.json").read_text())
    assert naive == [] and gate == recorded | {"recorded_in": str(FULL_WORLDS / "w4")}
    assert json.loads(run.files.gate.read_text()) == gate
    assert run.world_gate([])[0] == gate  # resumed: the same record is kept
    run.files.gate.write_text(json.dumps(recorded | {"passes": False}))
    with pytest.raises(ValueError, match="is not the gate recorded for this world"):
        run.world_gate([])
