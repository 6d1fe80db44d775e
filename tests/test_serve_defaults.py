"""The server's default models come from experiment.defaults, without the sweep."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from antidistill.experiment.defaults import default_artifacts

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"


def test_default_paths_build_once_and_are_reused(tmp_path):
    cfg = yaml.safe_load(QUICK.read_text())
    cfg["world"]["n_train_pool"], cfg["world"]["n_holdout"] = 40, 12
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump({"world": cfg["world"], "sampling": {"max_new_tokens": 6, "batch_size": 16}}))
    paths = default_artifacts(tmp_path / "cache", progress=False, config=path)
    for k in ("teacher", "proxy", "grad", "holdout_traces"):
        assert Path(getattr(paths, k)).exists(), k
    from antidistill.gradient import read_gradient_metadata

    assert read_gradient_metadata(paths.grad)["source"] == "experiment.defaults"
    mtime = Path(paths.grad).stat().st_mtime_ns
    assert default_artifacts(tmp_path / "cache", progress=False, config=path) == paths
    assert Path(paths.grad).stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert not list(Path(paths.grad).parent.glob(".*.tmp"))  # written atomically


def test_the_server_does_not_import_the_sweep():
    code = ("import sys, antidistill.serve.app, antidistill.serve.live, antidistill.experiment.defaults; "
            "print('antidistill.experiment.sweep' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
