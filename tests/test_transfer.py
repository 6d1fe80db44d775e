"""The transfer score: rank correlation against scipy, its nucleus and skipping rules, its interval, the
experiment-level score on tiny toy-world models and the `transfer-score` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from scipy import stats
from typer.testing import CliRunner

from antidistill.cli import app
from antidistill.experiment.transfer_score import transfer_score
from antidistill.gradient import compute_proxy_gradient
from antidistill.tokenizer_compat import load_tokenizer
from antidistill.transfer import (
    average_ranks,
    bootstrap_mean_interval,
    nucleus_mask,
    position_agreement,
    spearman,
)
from helpers_world import tiny, toy_splits, toy_tokenizer_dir

runner = CliRunner()


@pytest.mark.parametrize("seed", range(5))
def test_spearman_and_ranks_match_scipy_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 3 + seed * 7
    a = torch.randint(0, 4, (n,), generator=gen).double()  # many ties
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    b[: n // 3] = b[0]  # ties on the other side too
    assert average_ranks(a).tolist() == pytest.approx(stats.rankdata(a.numpy()).tolist())
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman(b, b) == pytest.approx(1.0) and spearman(b, -b) == pytest.approx(-1.0)


def test_spearman_is_nan_where_undefined():
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))
    assert math.isnan(spearman(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="two 1-D tensors of one length"):
        spearman(torch.zeros(3), torch.zeros(4))


def test_nucleus_is_the_smallest_set_reaching_top_p():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]]).log()
    assert nucleus_mask(logp, 0.95).tolist() == [[True, True, True, False], [True, False, False, False]]
    assert nucleus_mask(logp, 0.8).tolist() == [[True, True, False, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="top_p"):
        nucleus_mask(logp, 0.0)


def test_agreement_over_the_nucleus_only_and_skipping():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05],    # nucleus {0, 1, 2}
                         [0.97, 0.01, 0.01, 0.01],  # nucleus {0}: skipped
                         [0.4, 0.4, 0.1, 0.1],      # nucleus all 4
                         [0.5, 0.5, 0.0, 0.0]]).clamp_min(1e-9).log()
    dp = torch.tensor([[1.0, 2.0, 3.0, 100.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 0.0, 0.0]])
    ds = torch.tensor([[10.0, 20.0, 30.0, -5.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([True, True, True, True])
    agree = position_agreement(dp, ds, logp, mask)
    assert agree.nucleus_size.tolist() == [3, 1, 4, 2]
    assert agree.used.tolist() == [True, False, True, False]  # row 3: the student's Δ̂ is constant on it
    # token 3 (outside the nucleus) does not count
    assert agree.rho[0].item() == pytest.approx(1.0) and agree.rho[2].item() == pytest.approx(-1.0)
    assert agree.score == pytest.approx(0.0, abs=1e-12)
    masked = position_agreement(dp, ds, logp, torch.tensor([True, True, False, True]))
    assert masked.used.tolist() == [True, False, False, False] and masked.score == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must share one"):
        position_agreement(dp, ds[:, :3], logp)


def test_identical_deltas_score_one_and_negated_minus_one():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(50, 30, generator=gen)
    logp = torch.log_softmax(torch.randn(50, 30, generator=gen), -1)
    assert position_agreement(d, d.clone(), logp).score == pytest.approx(1.0, abs=1e-12)
    assert position_agreement(d, -d, logp).score == pytest.approx(-1.0, abs=1e-12)


def test_unrelated_deltas_score_near_zero_within_the_null_standard_error():
    gen = torch.Generator().manual_seed(1)
    n_pos, vocab = 400, 40
    logp = torch.log_softmax(torch.randn(n_pos, vocab, generator=gen) * 0.7, -1)
    agree = position_agreement(torch.randn(n_pos, vocab, generator=gen), torch.randn(n_pos, vocab, generator=gen), logp)
    sizes = agree.nucleus_size[agree.used].double()
    # under independence each ρ has mean 0 and variance 1/(n − 1) for n nucleus tokens
    se = math.sqrt(float((1.0 / (sizes - 1)).sum())) / agree.n_used
    assert agree.n_used > 300 and abs(agree.score) < 4 * se


def test_bootstrap_interval_resamples_traces():
    values = torch.tensor([0.2, 0.2, 0.2, 0.8, 0.8])
    groups = torch.tensor([0, 0, 0, 1, 1])
    low, high = bootstrap_mean_interval(values, groups, n_boot=500, seed=0)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.8)  # only three pooled means are possible
    same = bootstrap_mean_interval(torch.full((6,), 0.3), torch.arange(6), n_boot=100)
    assert same == pytest.approx((0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_mean_interval(torch.zeros(0), torch.zeros(0, dtype=torch.long)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny toy world on disk: teacher, proxy and an unrelated student, the proxy's g, holdout traces."""
    root = tmp_path_factory.mktemp("transfer")
    tok = load_tokenizer(toy_tokenizer_dir(str(root)))
    models = {}
    for role, fam, seed in (("teacher", "llama", 1), ("proxy", "qwen2", 2), ("student", "gpt2", 4)):
        models[role] = tiny(fam, tok, seed)
        models[role].save_pretrained(root / role)
        tok.save_pretrained(root / role)
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["holdout"][:6]]
    (root / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    g = compute_proxy_gradient(models["proxy"], tok, traces)
    save_file(g.grad, str(root / "g.safetensors"))
    return root, tok, models, traces, g.grad


def test_the_proxy_against_itself_scores_one_and_against_its_negated_g_minus_one(toy):
    _, tok, m, traces, g = toy
    same = transfer_score(m["teacher"], m["proxy"], m["proxy"], tok, traces, proxy_grad=g, max_positions=60)
    assert (same.score, same.low, same.high) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
    assert same.n_positions + same.n_skipped == 60
    flipped = transfer_score(m["teacher"], m["proxy"], m["proxy"], tok, traces, proxy_grad=g,
                             student_grad={k: -v for k, v in g.items()}, max_positions=60)
    assert flipped.score < -0.99
    other = transfer_score(m["teacher"], m["proxy"], m["student"], tok, traces, proxy_grad=g)
    assert -1.0 <= other.low <= other.score <= other.high <= 1.0 and other.n_traces == len(traces)


def test_transfer_score_command_end_to_end_and_a_bad_path(toy, tmp_path):
    root, *_ = toy
    out = tmp_path / "score.json"
    r = runner.invoke(app, ["transfer-score", "--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"),
                            "--student", str(root / "proxy"), "--traces", str(root / "traces.jsonl"),
                            "--proxy-grad", str(root / "g.safetensors"), "--positions", "40", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("transfer score +1.000 (95% CI +1.000 to +1.000")
    saved = json.loads(out.read_text())
    assert saved["score"] == pytest.approx(1.0, abs=1e-12) and saved["n_positions"] + saved["n_skipped"] == 40
    assert saved["student"] == str(root / "proxy") and list(tmp_path.iterdir()) == [out]
    bad = runner.invoke(app, ["transfer-score", "--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"),
                              "--student", str(root / "student"), "--traces", str(tmp_path / "missing.jsonl"),
                              "--out", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.jsonl" in lines[0]
    assert not (tmp_path / "bad.json").exists()
