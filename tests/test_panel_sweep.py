"""A sweep over the proxy zoo and the student panel on a tiny world: every arm's traces reach every student,
each row says its proxy and student, and the report leads with the held-out headline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from antidistill.config import load_config
from antidistill.experiment.sweep import Run, SweepConfig

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"
SMALL = {"family": "gpt2", "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}
SAME = {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}  # the quick world's student size
ZOO = {"proxies": {"gpt2-sibling": {"family": "gpt2", **SAME}, "llama-same": {"family": "llama", **SAME},
                   "gpt2-small": SMALL},
       "panel": {"opt": {"family": "opt", **SAME}}}


def panel_cfg(tmp: Path, **over) -> SweepConfig:
    data = yaml.safe_load(QUICK.read_text())
    data.pop("calibration")
    data |= {"name": "panel", "runs_dir": str(tmp / "runs"), "cache_dir": str(tmp / "cache"), "grid": "config",
             "gate": "skip", "include_greedy": False, "temperatures": [1.0], "ad_lambdas": [0.01], "perm_lambdas": [],
             "arms": {"whitebox": [0.01]}, "arm_proxies": ["qwen2-small", "gpt2-sibling", "llama-same", "gpt2-small"],
             "limit_train": 16, "limit_test": 8}
    data["world"] |= {"zoo": ZOO, "teacher_train": {"steps": 10, "batch_size": 8}, "pretrain": {"steps": 6, "batch_size": 8}}
    data["distill"] |= {"epochs": 1.0, "batch_size": 8}
    data |= over
    path = tmp / "panel.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(SweepConfig, path, [])


def test_arms_expand_per_proxy_and_panel_student(tmp_path):
    cfg = panel_cfg(tmp_path)
    assert cfg.expand_arms(["temperature", "antidistill", "whitebox"]) == [
        "temperature", "antidistill", "antidistill@gpt2-sibling", "antidistill@llama-same", "antidistill@gpt2-small",
        "whitebox", "whitebox@opt"]
    assert cfg.panel() == ["gpt2", "opt"]
    assert [p[0] for p in cfg.points()] == ["temperature", "antidistill", "antidistill@gpt2-sibling",
                                            "antidistill@llama-same", "antidistill@gpt2-small", "whitebox",
                                            "whitebox@opt"]
    with pytest.raises(ValueError, match="arm_proxies"):
        panel_cfg(tmp_path, arm_proxies=["nobody"])
    with pytest.raises(ValueError, match="arm_proxies"):
        panel_cfg(tmp_path, arm_proxies=["gpt2-sibling", "gpt2-sibling"])


@pytest.mark.slow
def test_every_arms_traces_are_distilled_into_every_panel_student(tmp_path):
    cfg = panel_cfg(tmp_path)
    check_panel_run(cfg, Run(cfg, progress=False).run())


def check_panel_run(cfg: SweepConfig, out: Path) -> None:
    df = pd.read_parquet(out / "results.parquet")
    methods = {p[0] for p in cfg.points()}
    # every point reaches both students, once each
    assert sorted(df.groupby("method").student.apply(sorted).map(tuple).unique()) == [("gpt2", "opt")]
    assert set(df.method) == methods and len(df) == 2 * len(methods)
    want = {"temperature": None, "antidistill": "qwen2-small", "antidistill@gpt2-sibling": "gpt2-sibling",
            "antidistill@llama-same": "llama-same", "antidistill@gpt2-small": "gpt2-small", "whitebox": "gpt2",
            "whitebox@opt": "opt"}
    for m, p in want.items():
        rows = df[df.method == m]
        assert rows.proxy.isna().all() if p is None else (rows.proxy == p).all(), m
    sizes = df.dropna(subset=["proxy"]).drop_duplicates("proxy").set_index("proxy").proxy_size.to_dict()
    assert sizes == {"qwen2-small": "smaller", "gpt2-sibling": "same", "llama-same": "same", "gpt2-small": "smaller",
                     "gpt2": "same", "opt": "same"}
    assert df[df.student == "opt"].student_family.eq("opt").all() and df.base_student.eq(df.student == "gpt2").all()
    # each named proxy has its own g; the panel student's students and rows lie in the point's panel folder
    assert {p.stem for p in (out / "gradients").glob("*.safetensors")} == {"gpt2-sibling", "llama-same", "gpt2-small",
                                                                           "opt"}
    row = json.loads((out / "points" / "whitebox@opt_0.01_s0" / "panel" / "opt" / "result.json").read_text())
    assert row["method"] == "whitebox@opt"
    # the traces are the point's own: the base student's and the panel student's rows share teacher accuracy
    both = df[df.method == "antidistill@llama-same"]
    assert both.teacher_acc.nunique() == 1 and both.student_acc.notna().all()
    assert (out / "report.md").is_file()  # (the report's transfer sections: tests/test_transfer.py)
    # resuming redoes nothing
    stamp = (out / "points" / "whitebox@opt_0.01_s0" / "panel" / "opt" / "result.json").stat().st_mtime_ns
    Run(cfg, progress=False).run()
    assert (out / "points" / "whitebox@opt_0.01_s0" / "panel" / "opt" / "result.json").stat().st_mtime_ns == stamp


def test_the_calibration_searches_lambda_for_every_proxy_and_panel_student(tmp_path, monkeypatch):
    """Each expanded arm gets its own g and its own λ curve; the design's points are the expanded arms'."""
    from antidistill.experiment import calibration
    from antidistill.experiment.calibration import Design, calibrate
    from antidistill.experiment.rundir import RunDir

    cfg = panel_cfg(tmp_path, grid="calibrated", calibration={
        "targets": [-5.0, -10.0], "arms": ["temperature", "antidistill", "whitebox"], "temperatures": [0.5, 1.0, 1.5],
        "lam_range": [0.001, 1.0], "lam_factor": 10.0, "refine": 0, "n_holdout": 100}, arms={})
    scale = {"antidistill": 1.0, "antidistill@gpt2-sibling": 2.0, "antidistill@llama-same": 4.0,
             "antidistill@gpt2-small": 8.0, "whitebox": 16.0, "whitebox@opt": 32.0}

    class StubRun:  # the calibration's view of a Run: no model is built
        def __init__(self):
            self.cfg, self.teacher, self.tok = cfg, None, {"teacher": None}
            self.splits = {"holdout": [{"id": i} for i in range(100)]}
            self.files = RunDir(tmp_path / "run")
            self.files.root.mkdir()
            self.grads = []
            run = self

            class Panel:
                def gradient_path(self, arm):
                    run.grads.append(arm)

            self.panel = Panel()

        def processor_for(self, arm, settings, param=None):
            return arm if settings.uses_proxy else None

    def fake_traces(model, tok, rows, settings, processor=None, **kw):
        """Teacher accuracy falls with τ, and with λ times the arm's own scale."""
        lam = settings.lam * scale[processor] if processor else 0.0
        acc = 0.9 - 0.2 * max(settings.tau - 0.5, 0) if settings.method != "greedy" else 0.9
        acc = max(acc - lam, 0.0)
        return [{"correct": i < round(acc * len(rows)), "answer_source": "written"} for i in range(len(rows))]

    monkeypatch.setattr(calibration, "generate_traces", fake_traces)
    run = StubRun()
    design = Design.load(calibrate(run, cfg.calibration, progress=False))
    arms = list(scale)
    assert sorted(run.grads) == sorted(arms)
    assert set(design.grid) == {"temperature", *arms}
    # a larger scale reaches the same target at a smaller λ
    lams = [design.grid[a][0] for a in arms]
    assert lams == sorted(lams, reverse=True)
    assert {p[0] for p in cfg.points(design.grid)} == {"temperature", *arms}


def test_the_ensemble_arm_runs_once_whole_and_once_per_family_a_student_shares(tmp_path):
    cfg = panel_cfg(tmp_path, arms={"ensemble": [0.01]})
    # proxies: qwen2, gpt2, llama, gpt2; students: gpt2 (base), opt: only gpt2 is a family both have
    assert cfg.expand_arms(["ensemble"]) == ["ensemble", "ensemble@-gpt2"]
    assert cfg.ensemble_members("ensemble") == ["qwen2-small", "gpt2-sibling", "llama-same", "gpt2-small"]
    assert cfg.ensemble_members("ensemble@-gpt2") == ["qwen2-small", "llama-same"]
    with pytest.raises(ValueError, match="leaves no proxy"):
        panel_cfg(tmp_path, arms={"ensemble": [0.01]}, arm_proxies=["gpt2-sibling", "gpt2-small"])
    with pytest.raises(ValueError, match="needs at least 2 proxies of other families"):
        panel_cfg(tmp_path, arms={"ensemble": [0.01]}, arm_proxies=["gpt2-sibling", "gpt2-small", "llama-same"])
    with pytest.raises(ValueError, match="at least 2 in arm_proxies"):
        panel_cfg(tmp_path, arms={"ensemble": [0.01]}, arm_proxies=["llama-same"])
    with pytest.raises(ValueError, match="names the family it leaves out"):
        cfg.ensemble_members("ensemble@gpt2")


def test_the_ensemble_arms_processor_is_the_mean_of_its_members_delta(tmp_path):
    """Run.processor_for('ensemble@-gpt2') against eq. 11 with Δ̂ computed by hand: each member shifted by ±ε·g
    (its own g), full forward, no cache, the two central differences averaged."""
    import copy

    import torch

    from antidistill.gradient import load_gradient
    from antidistill.proxy import load_causal_lm

    cfg = panel_cfg(tmp_path, arms={"ensemble": [0.01]})
    run = Run(cfg, progress=False)
    lam = 0.7
    settings = cfg.settings_for("ensemble@-gpt2", lam, 0)
    proc = run.processor_for("ensemble@-gpt2", settings, lam)
    ids = torch.tensor([[5, 9, 12, 7, 6]])
    scores = torch.randn(1, run.teacher.get_output_embeddings().weight.shape[0])
    got = torch.log_softmax(proc(ids, scores.clone()), -1)

    @torch.no_grad()
    def delta(name):
        model = load_causal_lm(run.panel.model_path(name))
        g = load_gradient(run.panel.gradient_path(f"antidistill@{name}"), model)

        def logp(scale):
            m = copy.deepcopy(model)
            for n, q in m.named_parameters():
                q.add_(scale * g[n].float())
            return torch.log_softmax(m(ids).logits[0, -1].float(), -1)
        return (logp(settings.eps) - logp(-settings.eps)) / (2 * settings.eps)

    d = (delta("qwen2-small") + delta("llama-same")) / 2
    want = torch.log_softmax(torch.log_softmax(scores[0], -1) / settings.tau + lam * d[: scores.shape[1]], -1)
    assert (lam * (d - delta("llama-same"))).abs().max() > 1e-2  # the members differ: the mean is not either
    torch.testing.assert_close(got[0], want, rtol=1e-3, atol=1e-3)
