"""`--full` in parts: world seeds, and the demo command's flags (no model is built)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.experiment.campaign import parse_world_seeds


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
