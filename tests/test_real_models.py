"""The paper's model pair, with the real tokenizers (../shared/tokenizers) and tiny random weights in
each real architecture and config shape: tokenizer compatibility, the dry run of the README's gsm8k
example, and sweep config → g → traces → a distillation step.

The shared files are never copied into the repository; every test here skips when they are absent.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.experiment.dryrun import dry_run
from antidistill.experiment.sweep import Run
from antidistill.experiment.sweepconfig import SweepConfig
from antidistill.gradient import grad_norm, load_gradient, read_gradient_metadata
from antidistill.io_utils import read_jsonl
from antidistill.prompting import encode_example
from antidistill.tokenizer_compat import check_compatible_tokenizers, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
TOK = SHARED / "tokenizers"
R1 = TOK / "deepseek-ai--DeepSeek-R1-Distill-Qwen-7B"
QWEN = TOK / "Qwen--Qwen2.5-1.5B-Instruct"
LLAMA = TOK / "meta-llama--Llama-3.2-3B-Instruct"
GSM8K = SHARED / "data" / "gsm8k"

pytestmark = pytest.mark.skipif(not all(p.is_dir() for p in (R1, QWEN, LLAMA, GSM8K)),
                                reason="the shared tokenizers and GSM8K (../shared) are not here")
runner = CliRunner()


@pytest.fixture(scope="module")
def toks():
    return {"teacher": load_tokenizer(R1), "proxy": load_tokenizer(QWEN), "student": load_tokenizer(LLAMA)}


def test_the_papers_pair_is_compatible(toks):
    match = check_compatible_tokenizers(toks["teacher"], toks["proxy"])
    assert (match.n_teacher, match.n_same) == (151_665, 151_658)
    assert [i for i, _, _ in match.by_role] == list(range(151643, 151650))
    assert (151644, "<｜User｜>", "<|im_start|>") in match.by_role
    assert match.summary() == "compatible: 151,658 of 151,665 ids decode alike; 7 control ids map by role (151643-151649)"


@pytest.mark.parametrize("pair", [("proxy", "student"), ("student", "proxy")])
def test_qwen_and_llama_are_refused_naming_the_first_ids(toks, pair):
    with pytest.raises(ValueError, match=r"not compatible .*id 410: teacher '\S+' vs proxy '\S+'"):
        check_compatible_tokenizers(toks[pair[0]], toks[pair[1]])


def test_check_tokenizers_command():
    ok = runner.invoke(app, ["check-tokenizers", str(R1), str(QWEN)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1].startswith("compatible: 151,658 of 151,665 ids")
    bad = runner.invoke(app, ["check-tokenizers", str(QWEN), str(LLAMA)])
    assert bad.exit_code == 2 and "id 410: teacher 'ith' vs proxy '00'" in bad.output
    missing = runner.invoke(app, ["check-tokenizers", str(R1), "/nonexistent/tok"])
    assert missing.exit_code == 2 and "/nonexistent/tok" in missing.output and "Traceback" not in missing.output


def test_dry_run_of_the_readme_gsm8k_example(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository root
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # offline, as the example promises
    r = runner.invoke(app, ["sweep", "--config", "examples/gsm8k.yaml", "--dry-run",
                            "--set", f"runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    assert "teacher/proxy tokenizers: compatible: 151,658 of 151,665 ids" in r.output
    assert "data: gsm8k from ../shared/data/gsm8k (train 5231, holdout 2242, test 1319)" in r.output
    assert "points: 26 (13 per seed" in r.output
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, toks):
    """Tiny random weights in the real shapes: Qwen2 teacher (R1-Distill-Qwen-7B: vocab 152,064, untied,
    BOS = EOS = 151643), Qwen2 proxy (Qwen2.5-3B: vocab 151,936, tied) and Llama student (Llama-3.2-3B's
    config.json shape: vocab 128,256, tied), each beside its real tokenizer."""
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=4096)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=152064, tie_word_embeddings=False, bos_token_id=151643,
                                           eos_token_id=151643, rope_theta=10000.0, **small))
    proxy = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, tie_word_embeddings=True, bos_token_id=151643,
                                         eos_token_id=151643, rope_theta=1e6, **small))
    llama = json.loads((LLAMA / "config.json").read_text())
    student = LlamaForCausalLM(LlamaConfig(**{k: llama[k] for k in ("vocab_size", "tie_word_embeddings", "bos_token_id",
                                                                     "eos_token_id", "rope_theta")}, **small))
    return {"teacher": _save(teacher, toks["teacher"], root / "teacher"),
            "proxy": _save(proxy, toks["proxy"], root / "proxy"),
            "student": _save(student, toks["student"], root / "student"), "root": root}


def _config(models, **over) -> SweepConfig:
    cfg = {"name": "tiny-real", "runs_dir": str(models["root"] / "runs"), "dataset": "gsm8k", "data_path": str(GSM8K),
           "teacher": models["teacher"], "proxy": models["proxy"], "student": models["student"],
           "limit_train": 4, "limit_test": 2, "include_greedy": False, "temperatures": [], "ad_lambdas": [0.01],
           "perm_lambdas": [], "seeds": [0], "n_eval_traces": 2,
           "sampling": {"max_new_tokens": 4, "answer_tokens": 2, "batch_size": 4},
           "distill": {"lora_r": 4, "lora_alpha": 4, "epochs": 1.0, "batch_size": 4, "eval_every": 100}}
    return SweepConfig(**(cfg | over))


def test_dry_run_reads_the_model_configs(models):
    lines = "\n".join(dry_run(_config(models)))
    assert "teacher: " in lines and "qwen2, vocab 152064" in lines and "llama, vocab 128256" in lines
    assert "compatible: 151,658 of 151,665" in lines


def test_sweep_config_to_gradient_traces_and_a_distillation_step(models, toks):
    run = Run(_config(models), progress=False)
    # g is taken on the teacher's token ids: its tokenizer and chat template, completion-only labels
    holdout = run.holdout_traces()
    meta = read_gradient_metadata(run.gradient_path())
    teacher_tokens = sum(sum(x != -100 for x in encode_example(toks["teacher"], r["question"], r["completion"])["labels"])
                         for r in holdout)
    assert int(meta["n_tokens"]) == teacher_tokens
    from_file = grad_norm(load_gradient(run.gradient_path(), run.proxy))
    assert float(meta["grad_norm"]) > 0 and float(meta["grad_norm"]) == pytest.approx(from_file)
    row = run.point("antidistill", 0.01, 0)
    files = run.files.point("antidistill", 0.01, 0)
    traces = read_jsonl(files.traces)
    assert len(traces) == len(run.splits["train"]) > 0 and all("completion" in t for t in traces)
    history = json.loads((files.student / "history.json").read_text())
    assert max(h["step"] for h in history) >= 1  # the student took a distillation step
    assert row["n_traces"] == len(traces) and row["n_test"] == 2


def test_the_sweep_warns_when_eps_is_far_from_the_best(models):
    run = Run(_config(models, name="tiny-real-eps"), progress=False)
    run.files.fd_check.parent.mkdir(parents=True, exist_ok=True)
    run.files.fd_check.write_text(json.dumps({"rows": [], "best_eps_float32": 1e-4, "best_eps_bfloat16": 1e-2}))
    run.cfg.sampling.eps = 1e-3  # 10x: within the tolerance
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.check_eps() == 1e-4
    run.cfg.sampling.eps = 1e-2  # 100x
    with pytest.warns(RuntimeWarning, match=r"sampling.eps=0.01 is far from the best ε 0.0001 .*‖g‖ = "):
        run.check_eps()
    assert yaml.safe_load(run.files.config.read_text())["sampling"]["eps"] == 0.01
