"""`engine: vllm` in a sweep: the teacher's traces of every point come from vLLM's offline engine."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from antidistill.config import load_config
from antidistill.io_utils import read_jsonl
from antidistill.generation import generate_traces
from antidistill.experiment.sweep import Run, SweepConfig
from antidistill.proxy import load_causal_lm
from antidistill.tokenizer_compat import load_tokenizer

from vllm_helpers import require_vllm_or_skip

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"
# the quick world with head_dim 32 (vLLM's CPU attention refuses 16)
WORLD = ["world.teacher={family: llama, hidden: 64, layers: 1, heads: 2, intermediate: 64}",
         "world.proxy={family: qwen2, hidden: 32, layers: 1, heads: 1, intermediate: 32}"]


def test_bad_engine_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="grid='calibrated' needs engine='hf'"):
        load_config(SweepConfig, QUICK, ["engine=vllm", f"runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match="arms .* run on engine='hf'"):
        load_config(SweepConfig, QUICK, ["engine=vllm", "grid=config", "arms={whitebox: [0.1]}", f"runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match="engine must be one of"):
        load_config(SweepConfig, QUICK, ["engine=sglang", f"runs_dir={tmp_path}"])
    cfg = load_config(SweepConfig, QUICK, ["engine=vllm", "grid=config", f"runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match="needs its completer"):
        Run(cfg, progress=False)


def test_vllm_sweep_generates_the_teacher_traces(tmp_path, monkeypatch):
    require_vllm_or_skip()
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from antidistill.engines.vllm.offline import sweep_completer
    from antidistill.engines.vllm.processor import OfflineLogitsProcessor

    sets = [f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "engine=vllm", "grid=config",
            "teacher_eval=test", "gate=skip",
            "seeds=[0]", "temperatures=[1.0]", "ad_lambdas=[0.2]", "perm_lambdas=[0.2]", "include_greedy=true",
            "limit_train=16", "limit_test=8", "sampling.max_new_tokens=24", *WORLD]
    cfg = load_config(SweepConfig, QUICK, sets)
    added = OfflineLogitsProcessor.stats["added"]
    out = Run(cfg, progress=False, completer_factory=sweep_completer).run()
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df.method) == ["antidistill", "greedy", "permutation", "temperature"]
    assert OfflineLogitsProcessor.stats["added"] - added >= 4 * (16 + 8)  # every teacher request went through vLLM
    # the greedy point's teacher rows are the transformers path's (same prompts, settings and scoring)
    run = Run(cfg, progress=False, completer_factory=sweep_completer)
    tok = load_tokenizer(run.paths["teacher"])
    hf = generate_traces(load_causal_lm(run.paths["teacher"]), tok, run.splits["test"],
                         cfg.settings_for("greedy", 0.0, 0), progress=False)
    vllm = read_jsonl(run.files.point("greedy", 0.0, 0).teacher_test)
    assert [r["completion"] for r in vllm] == [r["completion"] for r in hf]
    assert [r["correct"] for r in vllm] == [r["correct"] for r in hf]
