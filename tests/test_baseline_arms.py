"""The literature's baselines as sweep arms: proxy-logit mixing (γ) and the norm-matched random direction
(λ), from the config through the calibration to the results, the report and the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.config import load_config
from antidistill.experiment.calibration import Design
from antidistill.experiment.sweep import Run, SweepConfig
from antidistill.experiment.sweepconfig import config_text
from antidistill.gradient import grad_norm, read_gradient_metadata
from antidistill.mixing import ProxyMixLogitsProcessor
from antidistill.processor import AntidistillationLogitsProcessor

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"
BASELINES = "[temperature, proxy_mix, random_direction]"


def quick_cfg(tmp: Path, name="baselines", **over) -> SweepConfig:
    sets = [f"runs_dir={tmp / 'runs'}", f"cache_dir={tmp / 'cache'}", f"name={name}",
            f"calibration.arms={BASELINES}", "calibration.targets=[-20.0]", "calibration.gammas=[0.0, 0.5, 1.0]",
            "calibration.refine=1"]
    return load_config(SweepConfig, QUICK, sets + [f"{k}={v}" for k, v in over.items()])


# --- the config --------------------------------------------------------------------------------------


def test_the_arms_make_their_points_and_settings():
    cfg = SweepConfig(arms={"proxy_mix": [0.3, 0.6], "random_direction": [0.01]}, seeds=[0], temperatures=[1.0],
                      ad_lambdas=[], perm_lambdas=[], include_greedy=False)
    assert cfg.points() == [("temperature", 1.0, 0), ("proxy_mix", 0.3, 0), ("proxy_mix", 0.6, 0),
                            ("random_direction", 0.01, 0)]
    mix = cfg.settings_for("proxy_mix", 0.3, 0, tau=0.4)  # γ is the processor's: the teacher samples at the base τ
    assert (mix.method, mix.tau, mix.lam, mix.uses_proxy) == ("temperature", 0.4, 0.0, False)
    assert cfg.settings_for("proxy_mix", 0.3, 0).tau == cfg.sampling.tau
    rand = cfg.settings_for("random_direction", 0.01, 0, tau=0.4)
    assert (rand.method, rand.tau, rand.lam) == ("antidistill", 0.4, 0.01)
    with pytest.raises(ValueError, match="gamma=1.5"):
        cfg.settings_for("proxy_mix", 1.5, 0)


def test_a_gamma_outside_0_1_is_refused_naming_it():
    with pytest.raises(ValueError, match="gamma=1.5"):
        SweepConfig(arms={"proxy_mix": [0.5, 1.5]})
    SweepConfig(arms={"random_direction": [1.5]})  # a λ: any finite value


def test_default_gammas_leave_an_older_configs_text_unchanged():
    assert "gammas" not in config_text(SweepConfig())
    assert "gammas:" in config_text(SweepConfig(calibration={"gammas": [0.0, 0.5, 1.0]}))


def test_sweep_dry_run_lists_the_baseline_arms(tmp_path):
    r = CliRunner().invoke(app, ["sweep", "--config", str(QUICK), "--dry-run", "--set", f"runs_dir={tmp_path / 'runs'}",
                                 "--set", f"calibration.arms={BASELINES}"])
    assert r.exit_code == 0, r.output
    assert "'proxy_mix', 'random_direction'" in r.output
    assert "arm proxy_mix: proxy-logit mixing" in r.output and "arm random_direction: antidistillation with a seeded" in r.output
    assert "calibration of proxy_mix: γ on [0.0, 0.25, 0.5, 0.75, 1.0]" in r.output
    assert not (tmp_path / "runs").exists()


# --- a calibrated quick sweep on a tiny world ----------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    cfg = quick_cfg(tmp_path_factory.mktemp("baselines"))
    run = Run(cfg, progress=False)
    return run, run.run()


def test_both_arms_run_through_a_calibrated_sweep(baseline_run):
    run, out = baseline_run
    df = pd.read_parquet(out / "results.parquet")
    design = Design.load(out / "calibration.json")
    assert set(df.method) == {"greedy", "temperature", "proxy_mix", "random_direction"}
    assert set(design.grid) == {"temperature", "proxy_mix", "random_direction"}
    assert len(df) == 1 + sum(len(v) for v in design.grid.values())
    for arm in ("proxy_mix", "random_direction"):
        rows = df[df.method == arm]
        assert len(rows) >= 1 and (rows.tau == design.base_tau).all() and (rows.target == -20.0).all()
        assert rows.student_acc.between(0, 1).all() and rows.teacher_acc.between(0, 1).all()
    mix = df[df.method == "proxy_mix"]
    assert mix.param.between(0, 1).all()
    settings = json.loads(mix.settings.iloc[0])
    assert settings["method"] == "temperature" and settings["lam"] == 0.0
    assert json.loads(df[df.method == "random_direction"].settings.iloc[0])["method"] == "antidistill"


def test_the_calibration_searched_gamma_on_its_grid_and_lambda_geometrically(baseline_run):
    run, out = baseline_run
    info = json.loads((out / "calibration.json").read_text())
    gammas = [m["param"] for m in info["measured"]["proxy_mix"]]
    assert gammas[0] == 0.0 and all(0.0 <= g <= 1.0 for g in gammas)
    # the grid in order until accuracy fell below the target, then one bisection (a midpoint of the bracket)
    grid = [g for g in gammas if g in (0.0, 0.5, 1.0)]
    assert grid == [0.0, 0.5, 1.0][: len(grid)]
    assert all(m["tau"] == info["base_tau"] for m in info["measured"]["proxy_mix"])
    lams = [m["param"] for m in info["measured"]["random_direction"]]
    assert lams[0] == pytest.approx(run.cfg.calibration.lam_range[0])
    assert info["config"]["gammas"] == [0.0, 0.5, 1.0]


def test_the_random_direction_is_its_own_stage_with_gs_norm(baseline_run):
    run, out = baseline_run
    g, r = load_file(str(out / "proxy_grad.safetensors")), load_file(str(out / "random_direction.safetensors"))
    assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in r.items()}
    assert grad_norm(r) == pytest.approx(grad_norm(g), rel=1e-5)
    assert not any(torch.equal(g[k], r[k]) for k in g)
    meta = read_gradient_metadata(out / "random_direction.safetensors")
    assert meta["seed"] == str(run.cfg.world.seed) and "random" in meta["direction"]


def test_processor_for_builds_each_arms_processor(baseline_run):
    run, out = baseline_run
    mix = run.processor_for("proxy_mix", run.cfg.settings_for("proxy_mix", 0.3, 0, tau=0.5), 0.3)
    assert isinstance(mix, ProxyMixLogitsProcessor) and (mix.gamma, mix.tau) == (0.3, 0.5)
    with pytest.raises(ValueError, match="needs its γ"):
        run.processor_for("proxy_mix", run.cfg.settings_for("proxy_mix", 0.3, 0))
    rand = run.processor_for("random_direction", run.cfg.settings_for("random_direction", 0.01, 0))
    plain = run.processor_for("antidistill", run.cfg.settings_for("antidistill", 0.01, 0))
    assert isinstance(rand, AntidistillationLogitsProcessor) and rand.lam == 0.01
    ids = torch.tensor([[3, 4, 5, 6]])
    assert not torch.allclose(rand.compute_delta(ids), plain.compute_delta(ids))  # another direction than g


def test_the_report_lists_the_baselines_contrasts():
    """On simulated worlds with a known effect per arm: each baseline's contrast with temperature, and
    antidistillation against its random direction, at every target and pooled."""
    import numpy as np

    from antidistill.experiment.report import effect_rows
    from test_inference import simulate

    df = simulate(np.random.default_rng(0), worlds=8, seeds=2, n_test=4000, arms=("antidistill", "proxy_mix",
                  "random_direction"), effect={"antidistill": -0.06, "proxy_mix": -0.02, "random_direction": 0.0})
    rows = {(r["key"], r["target"]): r for r in effect_rows(df)}
    pooled = {k: r["e"]["estimate"] for (k, t), r in rows.items() if t is None}
    assert set(pooled) == {"antidistill", "proxy_mix", "random_direction", "antidistill_vs_random"}
    assert pooled["proxy_mix"] == pytest.approx(-0.02, abs=0.01)
    assert pooled["random_direction"] == pytest.approx(0.0, abs=0.01)
    assert pooled["antidistill_vs_random"] == pytest.approx(-0.06, abs=0.01)
    assert rows[("proxy_mix", None)]["label"] == "proxy-logit mixing (cross-family proxy, no g) − temperature"


def test_the_baselines_run_with_the_shipped_proxy_in_the_transfer_design():
    """transfer.yaml's proxy arms expand per zoo proxy; the baselines stay bare, and cannot name a model."""
    from antidistill.config import load_config
    from antidistill.experiment.arms import arm_spec
    from antidistill.experiment.sweepconfig import SweepConfig

    cfg = load_config(SweepConfig, Path(__file__).parents[1] / "src/antidistill/configs/transfer.yaml")
    arms = cfg.expand_arms(cfg.calibration.arms)
    assert "proxy_mix" in arms and "random_direction" in arms
    assert not any(a.startswith(("proxy_mix@", "random_direction@")) for a in arms)
    assert "antidistill@llama-same" in arms and "whitebox@opt" in arms
    for bad in ("proxy_mix@llama-same", "random_direction@gpt2-sibling"):
        with pytest.raises(ValueError, match="shipped proxy only"):
            arm_spec(bad)
