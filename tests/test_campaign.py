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
from antidistill.experiment.sweep import Run, SweepConfig, gate_on_record


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
