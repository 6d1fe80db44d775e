"""The finite-difference check, the tokenizer checks, atomic writes and the generate / check-fd commands."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.experiment.fdcheck import fd_check
from antidistill.io_utils import atomic_path
from antidistill.tokenizer_compat import check_compatible_tokenizers, check_vocab_sizes, load_tokenizer

from conftest import random_grad, tiny_proxy, tiny_teacher
from helpers_world import tiny, toy_splits, toy_tokenizer_dir

runner = CliRunner()


def test_fd_check_jvp_exact_and_sweet_spot():
    proxy = tiny_proxy()
    grad = random_grad(proxy)
    ids = torch.tensor([[2, 5, 9, 11, 7, 30, 22], [2, 8, 8, 14, 3, 19, 40]])
    res = fd_check(proxy, grad, ids, eps_grid=[1e-6, 1e-4, 1e-2, 1.0])
    rows = {(r["dtype"], r["difference"], r["eps"]): r["mean_sine_error"] for r in res.rows}
    jvp = [r for r in res.rows if r["difference"] == "jvp"][0]
    assert jvp["mean_sine_error"] < 1e-5 and jvp["n_positions"] == 14  # exact, to float32 round-off
    c = {e: rows[("float32", "central", e)] for e in (1e-6, 1e-4, 1e-2, 1.0)}
    assert c[1e-2] < 1e-3  # the sweet spot is accurate
    assert c[1e-6] > c[1e-2] and c[1.0] > c[1e-2]  # round-off below it, truncation above it
    assert rows[("float32", "central", 1e-2)] <= rows[("float32", "forward", 1e-2)]  # central is second order
    assert res.best_eps("float32") in (1e-4, 1e-2)
    assert min(v for (d, _, _), v in rows.items() if d == "bfloat16") > c[1e-2]


def test_check_fd_command_writes_table_and_plot(tmp_path):
    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    proxy = tiny("qwen2", tok, seed=3)
    proxy.save_pretrained(tmp_path / "proxy")
    tok.save_pretrained(tmp_path / "proxy")
    save_file(random_grad(proxy), str(tmp_path / "g.safetensors"))
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["holdout"][:2]]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    r = runner.invoke(app, ["check-fd", "--proxy", str(tmp_path / "proxy"), "--grad", str(tmp_path / "g.safetensors"),
                            "--traces", str(tmp_path / "t.jsonl"), "--out-dir", str(tmp_path / "fd"), "--positions", "4"])
    assert r.exit_code == 0, r.output
    assert "recommended ε" in r.output and "jvp" in r.output
    assert (tmp_path / "fd" / "fd_error.png").stat().st_size > 1000
    info = json.loads((tmp_path / "fd" / "fd_check.json").read_text())
    assert set(info["best_eps"]) == {"float32", "bfloat16"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = load_tokenizer(toy_tokenizer_dir(str(root)))
    for role, fam, seed in (("teacher", "llama", 1), ("proxy", "qwen2", 2)):
        m = tiny(fam, tok, seed)
        m.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        if role == "proxy":
            save_file(random_grad(m), str(root / "g.safetensors"))
    probs = [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in toy_splits()["test"][:5]]
    (root / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probs))
    return root


def test_generate_command_writes_traces_scores_and_settings(world):
    out = world / "out.jsonl"
    r = runner.invoke(app, ["generate", "--teacher", str(world / "teacher"), "--problems", str(world / "p.jsonl"),
                            "--out", str(out), "--method", "antidistill", "--proxy", str(world / "proxy"),
                            "--grad", str(world / "g.safetensors"), "--lam", "0.3", "--tau", "0.9",
                            "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert {"completion", "forced_answer", "correct", "meta"} <= set(row)
        assert row["meta"]["settings"]["lam"] == 0.3 and row["meta"]["settings"]["method"] == "antidistill"
        assert row["meta"]["torch_version"]


def test_generate_command_reasoning_only(world):
    """--reasoning-only: λ stops at the answer header; the rows say so, and the sampler is the processor's."""
    out = world / "ro.jsonl"
    r = runner.invoke(app, ["generate", "--teacher", str(world / "teacher"), "--problems", str(world / "p.jsonl"),
                            "--out", str(out), "--method", "antidistill", "--proxy", str(world / "proxy"),
                            "--grad", str(world / "g.safetensors"), "--lam", "0.3", "--max-new-tokens", "6",
                            "--reasoning-only"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5 and all(row["meta"]["reasoning_only"] is True for row in rows)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "antidistill"], "needs --proxy and --grad"),
        (["--method", "beam"], "method must be one of"),
        (["--method", "temperature", "--tau", "0"], "tau=0.0"),
        (["--method", "antidistill", "--lam", "nan", "--proxy", "P", "--grad", "G"], "lam=nan"),
        (["--method", "antidistill", "--eps", "-1", "--proxy", "P", "--grad", "G"], "eps=-1.0"),
        (["--method", "temperature", "--reasoning-only"], "--reasoning-only needs method antidistill"),
        (["--method", "antidistill", "--proxy", "P", "--grad", "G", "--reasoning-only", "--engine", "vllm"],
         "engine='vllm'"),
    ],
)
def test_generate_command_bad_input_writes_nothing(world, args, needle):
    out = world / "bad.jsonl"
    r = runner.invoke(app, ["generate", "--teacher", str(world / "teacher"), "--problems", str(world / "p.jsonl"),
                            "--out", str(out), *[a.replace("P", str(world / "proxy")).replace("G", str(world / "g.safetensors")) if a in ("P", "G") else a for a in args]])
    assert r.exit_code == 2
    assert needle in r.output
    assert not out.exists()


def test_tokenizer_checks(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    def make(vocab):
        t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="u"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="u")

    a = make({"u": 0, "x": 1, "y": 2})
    assert check_compatible_tokenizers(a, make({"u": 0, "x": 1, "y": 2, "z": 3})).n_same == 3  # ids the teacher never uses
    with pytest.raises(ValueError, match=r"id 2 \('y'\) is past the proxy's 2 ids"):
        check_compatible_tokenizers(a, make({"u": 0, "x": 1}))
    with pytest.raises(ValueError, match="not compatible.*id 1: teacher 'x' vs proxy 'y'"):
        check_compatible_tokenizers(a, make({"u": 0, "y": 1, "x": 2}))
    check_compatible_tokenizers(a, make({"u": 0, "x": 1, "y": 2}))
    with pytest.raises(ValueError, match="teacher vocabulary size 64 differs from proxy vocabulary size 48"):
        check_vocab_sizes(tiny_teacher(vocab=64), tiny_proxy())


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def _accelerate(args, cwd, timeout=400):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "antidistill.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def test_every_command_ends_the_process_group_it_ran_under(world, tmp_path):
    """A rank that exits with gloo's process group alive can abort (SIGABRT) after its work is done,
    so the CLI destroys the group when any command ends, on success or on error."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        r = runner.invoke(app, ["generate", "--teacher", str(world / "teacher"), "--problems", str(world / "p.jsonl"),
                                "--out", str(tmp_path / "g.jsonl"), "--method", "beam"])
        assert r.exit_code == 2 and "method must be one of" in r.output
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_process_generation_equals_one_process(world):
    base = ["generate", "--teacher", str(world / "teacher"), "--problems", str(world / "p.jsonl"), "--method", "greedy",
            "--max-new-tokens", "6", "--batch-size", "2"]
    r1 = runner.invoke(app, base + ["--out", str(world / "g1.jsonl")])
    assert r1.exit_code == 0, r1.output
    r2 = _accelerate(base + ["--out", str(world / "g2.jsonl")], world)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = [json.loads(x) for x in (world / "g1.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (world / "g2.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "meta"} for r in rows]  # noqa: E731
    assert strip(one) == strip(two)
    assert two[0]["meta"]["n_processes"] == 2 and one[0]["meta"]["n_processes"] == 1


def test_two_process_distillation_runs(world, tmp_path):
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["train"][:16]]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    tok = load_tokenizer(world / "teacher")
    student = tiny("gpt2", tok, seed=4)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    r = _accelerate(["distill", "--student", str(tmp_path / "student"), "--traces", str(tmp_path / "t.jsonl"),
                     "--out", str(tmp_path / "out"), "--set", "epochs=1", "--set", "batch_size=4",
                     "--set", "eval_every=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    # 16 traces, 2 processes × batch 4 per process: 2 optimizer steps in one epoch
    assert max(h["step"] for h in hist) == 2
    assert (tmp_path / "out" / "config.json").is_file()
