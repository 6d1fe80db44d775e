"""Delivered-trace scoring and reasoning-only antidistillation."""

from __future__ import annotations

import pytest
import torch

from antidistill import AntidistillationLogitsProcessor
from antidistill import generation
from antidistill.experiment.calibration import interpolate_params
from antidistill.experiment.evaluate import token_classes
from antidistill.generation import generate_traces
from antidistill.scoring import close_answer, written_answer
from antidistill.prompting import ANSWER_FORCING
from antidistill.settings import SamplingSettings
from antidistill.tokenizer_compat import load_tokenizer

from conftest import random_grad, tiny_proxy, tiny_teacher
from helpers_world import tiny, toy_splits, toy_tokenizer_dir


def test_written_answer_reads_the_trace_as_written():
    assert written_answer("2 + 3 = 5 .\n\n**Final Answer**\n\\boxed{5}") == "5"
    assert written_answer("So Ann has 17 .\n\n**Final Answer** 20}") == "20"  # corrupted block: its own answer
    assert written_answer("no header, ran out of tokens") is None
    assert close_answer("17} and more") == "17}" and close_answer(" 1") == " 1"


def _fake_generate(outputs):
    """A stand-in for ``_generate`` returning canned texts: first the traces, then the forced continuations."""
    calls = []

    def fake(model, tokenizer, prompts, max_new_tokens, gen_kwargs, processor, seeds=None):
        calls.append({"prompts": prompts, "gen_kwargs": gen_kwargs, "processor": processor})
        return outputs[len(calls) - 1][: len(prompts)]
    return fake, calls


@pytest.fixture
def tok(tmp_path):
    return load_tokenizer(toy_tokenizer_dir(str(tmp_path)))


def test_delivered_scoring_judges_the_stored_completion(monkeypatch, tok):
    probs = [{"id": "a", "question": "q1", "answer": "5"}, {"id": "b", "question": "q2", "answer": "7"},
             {"id": "c", "question": "q3", "answer": "9"}]
    traces = ["2 + 3 = 5 .\n\n**Final Answer**\n\\boxed{5}", "So it is 7 .\n\n**Final Answer** 20}", "4 + 5 = 9 ."]
    fake, calls = _fake_generate([traces, ["9} junk"]])
    monkeypatch.setattr(generation, "_generate", fake)
    s = SamplingSettings(method="temperature", tau=1.3, top_p=0.9, batch_size=8)
    rows = generate_traces(torch.nn.Module(), tok, probs, s, progress=False)
    assert [r["correct"] for r in rows] == [True, False, True]  # the corrupted block is charged
    assert [r["answer_source"] for r in rows] == ["trace", "trace", "forced"]
    assert rows[1]["completion"] == traces[1]  # stored exactly as sampled
    assert rows[2]["completion"] == traces[2] + ANSWER_FORCING + "9}"  # the sampled answer is delivered too
    assert len(calls) == 2 and len(calls[1]["prompts"]) == 1  # only the trace without an answer is forced
    assert calls[1]["gen_kwargs"] == calls[0]["gen_kwargs"] == s.sampling_kwargs()  # same sampler
    # the paper's student evaluation stays: cut at the header, force greedily
    fake, calls = _fake_generate([traces, ["5}", "7}", "9}"]])
    monkeypatch.setattr(generation, "_generate", fake)
    rows = generate_traces(torch.nn.Module(), tok, probs, s, progress=False, scoring="forced")
    assert [r["correct"] for r in rows] == [True, True, True]
    assert calls[1]["gen_kwargs"]["do_sample"] is False and calls[1]["processor"] is None


def test_delivered_scoring_with_real_models_is_seeded(tmp_path, tok):
    probs = toy_splits()["test"][:6]
    teacher = tiny("llama", tok)
    s = SamplingSettings(method="temperature", tau=1.0, max_new_tokens=12, answer_tokens=3, batch_size=4, seed=5)
    a = generate_traces(teacher, tok, probs, s, progress=False)
    b = generate_traces(teacher, tok, probs, s, progress=False)
    assert a == b
    for r in a:  # an untrained model writes no header: every answer is forced and delivered
        assert ANSWER_FORCING in r["completion"] and r["answer_source"] == "forced"


def test_reasoning_only_switches_lambda_off_after_the_header():
    teacher, proxy = tiny_teacher(), tiny_proxy()
    grad = random_grad(proxy)
    stop = [5, 6]
    full = AntidistillationLogitsProcessor(proxy, grad, lam=3.0, eps=1e-2, tau=0.8, pad_token_id=0)
    ro = AntidistillationLogitsProcessor(proxy, grad, lam=3.0, eps=1e-2, tau=0.8, pad_token_id=0, stop_ids=stop)
    plain = AntidistillationLogitsProcessor(proxy, grad, lam=0.0, eps=1e-2, tau=0.8, pad_token_id=0)
    ids = torch.tensor([[3, 4, 7, 8, 9], [3, 5, 6, 8, 9]])  # row 1 has generated the header
    scores = teacher(ids).logits[:, -1]
    out_full, out_ro, out_plain = full(ids, scores), ro(ids, scores), plain(ids, scores)
    assert ro.after_stop(ids).tolist() == [False, True]
    torch.testing.assert_close(out_ro[0], out_full[0])  # before the header: full antidistillation
    torch.testing.assert_close(out_ro[1], out_plain[1])  # after it: the teacher alone at τ
    assert not torch.allclose(out_full[1], out_plain[1])


def test_calibration_interpolates_the_parameter_for_each_target():
    picks = interpolate_params([0.0, 0.01, 0.02], [0.9, 0.7, 0.5], [0.8, 0.6, 0.95])
    assert [p["param"] for p in picks] == [pytest.approx(0.005), pytest.approx(0.015), 0.0]
    assert [p["inside_measured_range"] for p in picks] == [True, True, False]


def test_token_classes_split_results_reasoning_and_final_block(tok):
    sol = toy_splits()["test"][0]["solution"]
    cls = token_classes(tok, sol)
    ids = tok(sol, add_special_tokens=False)["input_ids"]
    assert len(cls) == len(ids) + 1 and cls[-1] == "final"
    text = tok.convert_ids_to_tokens(ids)
    for i, c in enumerate(cls[:-1]):
        if c == "result":
            assert text[i - 1].strip() == "=" and text[i].strip().isdigit()
    assert "**" in [t for t, c in zip(text, cls) if c == "final"]
    assert cls.count("result") >= 2
