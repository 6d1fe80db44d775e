"""Every documented command runs with its documented defaults, and a user's mistake is an error
message naming the bad value (exit status 2), never a traceback.

Commands whose defaults build the demo's toy world (serve, check-fd, build-world, demo, calibrate)
are checked for what they hand to the library, with the world-building functions replaced by
stand-ins; the library functions themselves have their own tests.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from antidistill.cli import COMMANDS, app
from antidistill.experiment.defaults import DefaultArtifacts
from antidistill.tokenizer_compat import load_tokenizer
from conftest import random_grad
from helpers_world import tiny, toy_splits, toy_tokenizer_dir

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> DefaultArtifacts:
    """A tiny teacher, proxy, g and holdout traces, in the shape of the toy world's defaults."""
    root = tmp_path_factory.mktemp("cli")
    tok = load_tokenizer(toy_tokenizer_dir(str(root)))
    for role, fam, seed in (("teacher", "llama", 1), ("proxy", "qwen2", 2), ("student", "gpt2", 4)):
        m = tiny(fam, tok, seed)
        m.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        if role == "proxy":
            save_file(random_grad(m), str(root / "g.safetensors"))
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["holdout"][:8]]
    (root / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    return DefaultArtifacts(str(root / "teacher"), str(root / "proxy"), str(root / "g.safetensors"),
                            str(root / "traces.jsonl"))


def _ok(r):
    assert r.exit_code == 0, r.output
    return r.output


def _user_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    for needle in needles:
        assert needle in r.output, r.output


def test_every_documented_command_is_registered():
    """The README's command table and the CLI list the same commands."""
    text = README.read_text()
    documented = {c for c in COMMANDS if f"antidistill {c}" in text}
    assert documented == set(COMMANDS)


def test_check_fd_with_no_arguments_uses_the_toy_world_defaults(artifacts, tmp_path, monkeypatch):
    from antidistill.experiment.fdcheck import fd_check

    seen = []
    monkeypatch.setattr("antidistill.cli.experiment.default_artifacts", lambda cache: seen.append(cache) or artifacts)
    # the command's defaults, on a smaller grid (the full grid is the library's, tested there)
    monkeypatch.setattr("antidistill.cli.experiment.fd_check",
                        lambda *a, **kw: fd_check(*a, eps_grid=[1e-3, 1e-2], include_jvp=False, **kw))
    monkeypatch.chdir(tmp_path)
    out = _ok(runner.invoke(app, ["check-fd"]))
    assert seen == [Path(".cache/antidistill")]
    assert "recommended ε" in out and (tmp_path / "runs" / "fd-check" / "fd_check.json").is_file()


def test_check_fd_mistakes(artifacts, tmp_path):
    _user_error(runner.invoke(app, ["check-fd", "--proxy", str(tmp_path / "nope"), "--grad", artifacts.grad,
                                    "--traces", artifacts.holdout_traces]), str(tmp_path / "nope"))
    _user_error(runner.invoke(app, ["check-fd", "--proxy", artifacts.proxy, "--grad", artifacts.grad,
                                    "--traces", str(tmp_path / "t.jsonl")]), str(tmp_path / "t.jsonl"))


def test_serve_with_no_arguments_serves_the_toy_world_defaults(artifacts, monkeypatch):
    seen, served = [], []
    monkeypatch.setattr("antidistill.cli.serve.default_artifacts", lambda cache: seen.append(cache) or artifacts)
    monkeypatch.setattr("antidistill.serve.app.serve_forever", served.append)
    _ok(runner.invoke(app, ["serve"]))
    (cfg,) = served
    assert seen == [cfg.cache_dir] and (cfg.teacher, cfg.proxy, cfg.grad) == (artifacts.teacher, artifacts.proxy,
                                                                            artifacts.grad)
    assert cfg.host == "127.0.0.1" and cfg.sampling.lam > 0


def test_serve_mistakes(artifacts):
    given = ["--teacher", artifacts.teacher, "--proxy", artifacts.proxy, "--grad", artifacts.grad]
    _user_error(runner.invoke(app, ["serve", *given, "--engine", "tgi"]), "'tgi'")
    _user_error(runner.invoke(app, ["serve", *given, "--set", "max_batch=zero"]), "max_batch")


def test_the_server_refuses_a_config_without_models():
    from antidistill.serve.app import build_server
    from antidistill.serve.config import ServeConfig

    with pytest.raises(ValueError, match="the server needs teacher and proxy and grad"):
        build_server(ServeConfig())


class _StubRun:
    """Stands in for experiment.sweep.Run: records the config the command built."""

    configs: list = []

    def __init__(self, cfg, **_kw):
        self.configs.append(cfg)
        self.cfg = cfg

    def run(self):
        return Path(self.cfg.runs_dir) / self.cfg.name


@pytest.mark.parametrize("flags, name", [([], "demo"), (["--quick"], "quick")])
def test_demo_runs_the_packaged_config(flags, name, monkeypatch):
    _StubRun.configs = []
    monkeypatch.setattr("antidistill.cli.experiment.Run", _StubRun)
    out = _ok(runner.invoke(app, ["demo", *flags]))
    (cfg,) = _StubRun.configs
    assert cfg.name == name and cfg.world == _packaged(name).world
    assert f"report: runs/{name}/report.md" in out


def test_demo_full_runs_one_sweep_per_world_seed_and_exports_each(monkeypatch, tmp_path):
    _StubRun.configs = []
    exported, reports = [], []
    monkeypatch.setattr("antidistill.experiment.campaign.Run", _StubRun)
    monkeypatch.setattr("antidistill.experiment.campaign.export_world", lambda run, dest: exported.append((run, dest)))
    monkeypatch.setattr("antidistill.experiment.campaign.write_report", lambda src, out: reports.append((src, out)))
    out = _ok(runner.invoke(app, ["demo", "--full", "--worlds", "3-4", "--export-to", str(tmp_path / "worlds")]))
    assert [(c.name, c.world.seed) for c in _StubRun.configs] == [("full-w3", 3), ("full-w4", 4)]
    assert all(c.calibration == _packaged("full").calibration for c in _StubRun.configs)
    assert exported == [(Path("runs/full-w3"), tmp_path / "worlds" / "w3"), (Path("runs/full-w4"), tmp_path / "worlds" / "w4")]
    assert reports == [(tmp_path / "worlds", tmp_path)] * 2  # the pooled report, rewritten after each world
    assert "report: runs/full-w4/report.md" in out


def test_demo_full_takes_another_design(monkeypatch, tmp_path):
    """`demo --full --config transfer.yaml`: the zoo and panel design, one sweep per world seed."""
    _StubRun.configs = []
    monkeypatch.setattr("antidistill.experiment.campaign.Run", _StubRun)
    _ok(runner.invoke(app, ["demo", "--full", "--worlds", "1", "--config", str(CONFIGS / "transfer.yaml")]))
    (cfg,) = _StubRun.configs
    assert (cfg.name, cfg.world.seed) == ("transfer-w1", 1) and cfg.world.zoo == _packaged("transfer").world.zoo
    # the same world build as full.yaml's (its cache is reused); the zoo is built beside it
    assert cfg.world.key() == dataclasses.replace(_packaged("full").world, seed=1).key()


def _packaged(name):
    from antidistill.config import load_config
    from antidistill.experiment.sweepconfig import SweepConfig

    return load_config(SweepConfig, CONFIGS / f"{name}.yaml")


def test_demo_mistake():
    _user_error(runner.invoke(app, ["demo", "--set", "seeds=[]"]), "seeds")


def test_build_world_builds_the_demo_world(monkeypatch, tmp_path):
    calls = []

    class World:
        root, metrics = tmp_path, {"teacher_test_accuracy": 0.5}

    monkeypatch.setattr("antidistill.cli.experiment.build_world", lambda w, cache, workers: calls.append((w, cache)) or World)
    out = _ok(runner.invoke(app, ["build-world"]))
    assert calls == [(_packaged("demo").world, ".cache/antidistill")]
    assert json.loads(out)["teacher_test_accuracy"] == 0.5
    _user_error(runner.invoke(app, ["build-world", "--set", "world.seed=abc"]), "world.seed")


def test_calibrate_calibrates_the_demo_config(monkeypatch, tmp_path):
    _StubRun.configs = []
    monkeypatch.setattr("antidistill.cli.experiment.Run", _StubRun)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"best_undefended": 0.9, "base_tau": 0.4, "base_tau_reason": "why",
                                "chosen": {"temperature": [{"target": -5.0, "param": 1.2, "inside_measured_range": True}]}}))
    monkeypatch.setattr("antidistill.cli.experiment.calibrate", lambda run, cfg: path)
    out = _ok(runner.invoke(app, ["calibrate"]))
    assert _StubRun.configs[0].name == "demo-calibration"
    assert "temperature: -5 → 1.2" in out and "base τ 0.4" in out


def test_sweep_dry_run_of_the_toy_config_writes_nothing(tmp_path):
    out = _ok(runner.invoke(app, ["sweep", "--config", str(CONFIGS / "quick.yaml"), "--dry-run",
                                  "--set", f"runs_dir={tmp_path / 'runs'}"]))
    assert "data: the toy world" in out and "points:" in out
    assert not (tmp_path / "runs").exists()


def test_sweep_mistakes(tmp_path):
    _user_error(runner.invoke(app, ["sweep", "--config", str(tmp_path / "missing.yaml")]), "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": "gsm8k"}))
    _user_error(runner.invoke(app, ["sweep", "--config", str(bad), "--dry-run"]), "needs model paths")


def test_report_mistake(tmp_path):
    _user_error(runner.invoke(app, ["report", str(tmp_path / "no-run")]), "no-run")


def test_gradient_on_the_teacher_s_tokenizer(artifacts, tmp_path):
    out = _ok(runner.invoke(app, ["gradient", "--proxy", artifacts.proxy, "--teacher", artifacts.teacher,
                                  "--traces", artifacts.holdout_traces, "--out", str(tmp_path / "g.safetensors")]))
    assert "‖g‖" in out and (tmp_path / "g.safetensors").is_file()
    _user_error(runner.invoke(app, ["gradient", "--proxy", artifacts.proxy, "--traces", str(tmp_path / "none.jsonl"),
                                    "--out", str(tmp_path / "g2.safetensors")]), "none.jsonl")


def test_distill_command(artifacts, tmp_path):
    out = _ok(runner.invoke(app, ["distill", "--student", str(Path(artifacts.teacher).parent / "student"),
                                  "--traces", artifacts.holdout_traces, "--out", str(tmp_path / "s"),
                                  "--set", "epochs=1", "--set", "batch_size=4", "--set", "eval_every=1"]))
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
    assert (tmp_path / "s" / "history.json").is_file()
    _user_error(runner.invoke(app, ["distill", "--student", str(tmp_path / "nobody"), "--traces",
                                    artifacts.holdout_traces, "--out", str(tmp_path / "s2")]), "nobody")


def test_check_tokenizers_on_the_toy_world_tokenizer(artifacts):
    out = _ok(runner.invoke(app, ["check-tokenizers", artifacts.teacher, artifacts.proxy]))
    assert out.startswith("compatible: ")


def test_generate_mistake(artifacts, tmp_path):
    _user_error(runner.invoke(app, ["generate", "--teacher", artifacts.teacher, "--problems", artifacts.holdout_traces,
                                    "--out", str(tmp_path / "o.jsonl"), "--tau", "-1"]), "tau")
