import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from antidistill import compute_proxy_gradient, load_gradient, save_gradient
from antidistill.gradient import read_gradient_metadata
from antidistill.tokenizer_compat import load_tokenizer
from antidistill.prompting import encode_example

from helpers_world import tiny, toy_splits, toy_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(toy_tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def traces():
    return [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["holdout"][:7]]


def reference_gradient(model, tok, traces):
    """Brute force: one sequence at a time, sum of completion-token NLLs / total completion tokens."""
    model.zero_grad()
    exs = [encode_example(tok, t["question"], t["completion"]) for t in traces]
    n = sum(sum(1 for x in e["labels"] if x != -100) for e in exs)
    for e in exs:
        ids = torch.tensor([e["input_ids"]])
        labels = torch.tensor([e["labels"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt = labels[0, 1:]
        keep = tgt != -100
        nll = -logp[keep].gather(-1, tgt[keep][:, None]).sum()
        (nll / n).backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return g, n


def test_masking_and_mean_match_reference(tok, traces):
    model = tiny("qwen2", tok)
    result = compute_proxy_gradient(model, tok, traces, batch_size=3)
    ref, n = reference_gradient(model, tok, traces)
    assert result.n_tokens == n and result.n_traces == len(traces)
    for k in ref:
        torch.testing.assert_close(result.grad[k], ref[k], atol=1e-6, rtol=1e-4)
    # the prompt is masked: the number of counted tokens is exactly the completions + EOS
    assert n == sum(len(tok(t["completion"], add_special_tokens=False)["input_ids"]) + 1 for t in traces)


def test_batch_size_does_not_change_g(tok, traces):
    model = tiny("qwen2", tok)
    a = compute_proxy_gradient(model, tok, traces, batch_size=1)
    b = compute_proxy_gradient(model, tok, traces, batch_size=7)
    for k in a.grad:
        torch.testing.assert_close(a.grad[k], b.grad[k], atol=1e-7, rtol=1e-5)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)


def test_save_load_roundtrip_and_metadata(tok, traces, tmp_path):
    model = tiny("qwen2", tok)
    result = compute_proxy_gradient(model, tok, traces)
    path = save_gradient(tmp_path / "g.safetensors", result)
    meta = read_gradient_metadata(path)
    assert meta["n_traces"] == str(len(traces)) and meta["n_tokens"] == str(result.n_tokens)
    assert meta["n_params"] == str(sum(p.numel() for p in model.parameters()))
    assert float(meta["loss"]) == pytest.approx(result.loss)
    assert meta["antidistill_version"] and meta["proxy_name"]
    g = load_gradient(path, model)
    for k in g:
        assert torch.equal(g[k], result.grad[k])
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_load_rejects_mismatched_names_and_shapes(tok, tmp_path):
    model = tiny("qwen2", tok)
    other = tiny("llama", tok)
    path = tmp_path / "wrong.safetensors"
    save_file({k: torch.ones_like(v) for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"does not match the proxy: missing model\.embed_tokens|missing .*unexpected|missing"):
        load_gradient(path, model)
    g = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    name = next(iter(g))
    g[name] = torch.ones(3, 3)
    with pytest.raises(ValueError, match=rf"shape of {name}: gradient \(3, 3\) vs proxy"):
        load_gradient(g, model)


@pytest.mark.parametrize("value, needle", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (0.0, "all zeros")])
def test_bad_values_are_rejected_and_nothing_written(tok, tmp_path, value, needle):
    from antidistill.gradient import ProxyGradient

    model = tiny("qwen2", tok)
    g = {n: torch.full_like(p, value) if value != 0.0 else torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=needle):
        load_gradient(g, model)
    out = tmp_path / "g.safetensors"
    with pytest.raises(ValueError, match=needle):
        save_gradient(out, ProxyGradient(grad=g, loss=1.0, n_traces=1, n_tokens=1))
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="does not exist"):
        load_gradient("/nonexistent/g.safetensors", tiny("qwen2", tok))


def test_two_process_accelerate_equals_one_process(tok, traces, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) gives the single-process gradient."""
    model = tiny("qwen2", tok, seed=5)
    model.save_pretrained(tmp_path / "proxy")
    tok.save_pretrained(tmp_path / "proxy")
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "antidistill.cli", "gradient", "--proxy", str(tmp_path / "proxy"),
           "--traces", str(tmp_path / "traces.jsonl"), "--out", str(tmp_path / "g2.safetensors"), "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_gradient(tmp_path / "g2.safetensors", model)
    one = compute_proxy_gradient(model, tok, traces, batch_size=3)
    for k in one.grad:
        torch.testing.assert_close(two[k], one.grad[k], atol=1e-7, rtol=1e-5)
    meta = read_gradient_metadata(tmp_path / "g2.safetensors")
    assert meta["n_traces"] == str(len(traces)) and meta["n_tokens"] == str(one.n_tokens)
    assert meta["n_processes"] == "2"  # the work really was split across two processes
