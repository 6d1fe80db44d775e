"""Adaptive distillers, each checked on a tiny world against what it claims to do."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from antidistill.config import dump_yaml, load_config
from antidistill.experiment.distill import DistillConfig, distill
from antidistill.experiment.distiller_stages import DistillerStages, with_distiller
from antidistill.experiment.distiller_table import distiller_table, distiller_table_lines, recovered_fraction
from antidistill.experiment.distillers import (
    AnswersOnly,
    CleanMix,
    WarmStart,
    alignment_weights,
    answers_only,
    clean_mix,
    clean_set,
    correct_only,
    harder_config,
    sample_student,
    trace_cosines,
)
from antidistill.scoring import is_correct, written_answer
from antidistill.experiment.sweepconfig import SweepConfig, config_text
from antidistill.functional import completion_nll
from antidistill.prompting import encode_example
from antidistill.settings import SamplingSettings
from antidistill.tokenizer_compat import load_tokenizer

from helpers_world import tiny, toy_splits, toy_tokenizer_dir

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(toy_tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


def _traces(n: int, wrong_every: int = 3) -> list[dict]:
    """Toy teacher rows from the ground-truth solutions; every ``wrong_every``-th has its boxed answer changed,
    then each row is scored as the sweep scores delivered traces (its own final block against the label)."""
    rows = []
    for i, p in enumerate(toy_splits()["train"][:n]):
        completion = p["solution"]
        if i % wrong_every == 0:
            completion = completion.replace(f"\\boxed{{{p['answer']}}}", f"\\boxed{{{int(p['answer']) + 1}}}")
        answer = written_answer(completion)
        rows.append({"id": p["id"], "question": p["question"], "answer": p["answer"], "completion": completion,
                     "forced_answer": answer, "correct": is_correct(answer, p["answer"]), "answer_source": "trace"})
    return rows


def test_correct_only_keeps_exactly_the_traces_with_a_correct_delivered_answer():
    traces = _traces(12)
    kept = correct_only(traces)
    assert [t["id"] for t in kept] == [t["id"] for i, t in enumerate(traces) if i % 3 != 0]
    assert all(written_answer(t["completion"]) == t["answer"] for t in kept)
    assert len(kept) == 8


@pytest.mark.parametrize("n, fraction, expected", [(20, 0.25, 5), (25, 0.1, 2), (7, 1.0, 7), (10, 0.1, 1)])
def test_clean_mix_adds_round_f_n_ground_truth_rows_seeded(n, fraction, expected):
    traces = _traces(n)
    problems = {p["id"]: p for p in toy_splits()["train"]}
    mixed = clean_mix(traces, problems, fraction, seed=3)
    assert expected == round(fraction * n)
    assert mixed[:n] == traces  # every trace kept, unchanged
    clean = mixed[n:]
    assert len(clean) == expected and len({c["id"] for c in clean}) == expected
    for c in clean:
        assert c["source"] == "clean" and c["completion"] == problems[c["id"]]["solution"]
    assert clean_mix(traces, problems, fraction, seed=3) == mixed  # seeded
    if 0 < expected < n:
        others = [tuple(r["id"] for r in clean_mix(traces, problems, fraction, seed=s)[n:]) for s in range(4, 12)]
        assert any(o != tuple(c["id"] for c in clean) for o in others)
    with pytest.raises(ValueError, match="fraction=0"):
        clean_mix(traces, problems, 0.0, seed=0)


def test_clean_set_is_seeded_and_refuses_more_than_there_are():
    train = toy_splits()["train"]
    a, b = clean_set(train, 5, 1), clean_set(train, 5, 1)
    assert a == b and all(r["completion"] == next(p["solution"] for p in train if p["id"] == r["id"]) for r in a)
    with pytest.raises(ValueError, match=f"n_clean={len(train) + 1}"):
        clean_set(train, len(train) + 1, 0)


def test_harder_training_updates_every_parameter_for_three_times_the_steps(tmp_path, tok):
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["train"][:8]]
    cfg = DistillConfig(epochs=1.0, batch_size=4, eval_every=2)  # a logged loss every step
    hard = harder_config(cfg)
    assert hard.lora is False and hard.epochs == 3.0 and hard.lr == cfg.lr and cfg.lora is True  # cfg untouched
    assert harder_config(cfg, 2.0, lr=1e-4).lr == 1e-4
    runs = {}
    for name, c in (("naive", cfg), ("harder", hard)):
        start = tiny("gpt2", tok, seed=4)
        before = {n: p.detach().clone() for n, p in start.named_parameters()}
        model, history = distill(start, tok, traces, c, output_dir=tmp_path / name)
        changed = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
        runs[name] = (sum("loss" in h for h in history), changed)
    assert runs["naive"][0] == 2 and runs["harder"][0] == 6
    assert all(runs["harder"][1].values())
    assert not all(runs["naive"][1].values())  # LoRA leaves embeddings and layer norms as they were


def _brute_force_grad(model, tok, row) -> torch.Tensor:
    """∇θ of the mean completion-token NLL, flattened, from one forward pass written out here."""
    ex = encode_example(tok, row["question"], row["completion"])
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    params = [p for p in model.parameters() if p.requires_grad]
    nll = completion_nll(model(input_ids=ids).logits, labels) / int((labels[:, 1:] != -100).sum())
    return torch.cat([g.flatten() for g in torch.autograd.grad(nll, params)]).double()


def test_gradient_alignment_weights_match_a_brute_force_cosine_and_anti_alignment_gets_zero(tok):
    model = tiny("gpt2", tok, seed=5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["train"][:4]]
    clean = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["train"][10:11]]
    grads = [_brute_force_grad(model, tok, t) for t in traces]
    ref = _brute_force_grad(model, tok, clean[0])  # a clean row's gradient as the reference
    ref_dict = _unflatten(ref, model, names)
    expected = [float(g @ ref / (g.norm() * ref.norm())) for g in grads]
    got = trace_cosines(model, tok, traces, ref_dict)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    w = alignment_weights(got)
    positive = [max(c, 0.0) for c in expected]
    assert w == pytest.approx([p / np.mean(positive) for p in positive], rel=1e-5)
    # a reference that points against trace 0's gradient: its cosine is −1 and its weight 0
    anti = trace_cosines(model, tok, traces, _unflatten(-grads[0], model, names))
    assert anti[0] == pytest.approx(-1.0, abs=1e-6)
    assert alignment_weights(anti)[0] == 0.0
    assert alignment_weights([-0.5, -0.1]) == [0.0, 0.0]


def _unflatten(flat: torch.Tensor, model, names) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    params = dict(model.named_parameters())
    for n in names:
        k = params[n].numel()
        out[n] = flat[i : i + k].view_as(params[n]).float()
        i += k
    return out


def test_weighted_sft_with_unit_weights_is_plain_sft_and_zero_weights_train_nothing(tmp_path, tok):
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["train"][:8]]
    cfg = DistillConfig(epochs=1.0, batch_size=4, eval_every=2)
    plain, hp = distill(tiny("gpt2", tok, seed=4), tok, traces, cfg, output_dir=tmp_path / "a")
    ones, ho = distill(tiny("gpt2", tok, seed=4), tok, traces, cfg, output_dir=tmp_path / "b", weights=[1.0] * 8)
    assert hp == ho
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ones.parameters()))
    base = tiny("gpt2", tok, seed=4)
    zero, hz = distill(copy.deepcopy(base), tok, traces, cfg, output_dir=tmp_path / "c", weights=[0.0] * 8)
    assert all(h["loss"] == 0.0 for h in hz if "loss" in h)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), zero.parameters()))  # LoRA's B stays 0
    with pytest.raises(ValueError, match="one weight per trace"):
        distill(base, tok, traces, cfg, output_dir=tmp_path / "d", weights=[1.0])
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        distill(base, tok, traces, cfg, output_dir=tmp_path / "d", weights=[-1.0] + [1.0] * 7)


def test_answers_only_keeps_exactly_the_samples_that_reach_the_teachers_answer():
    teacher = [{"id": "a", "forced_answer": "12"}, {"id": "b", "forced_answer": "7"}, {"id": "c", "forced_answer": ""}]
    samples = [  # a stand-in sampler's output: several samples per problem
        {"id": "a", "question": "qa", "completion": "s0", "forced_answer": "12"},
        {"id": "a", "question": "qa", "completion": "s1", "forced_answer": "13"},
        {"id": "a", "question": "qa", "completion": "s2", "forced_answer": "12"},
        {"id": "b", "question": "qb", "completion": "s3", "forced_answer": "8"},
        {"id": "c", "question": "qc", "completion": "s4", "forced_answer": ""},  # no answer matches nothing
        {"id": "z", "question": "qz", "completion": "s5", "forced_answer": "1"},  # no teacher row
    ]
    kept = answers_only(teacher, samples)
    assert [k["completion"] for k in kept] == ["s0", "s2"]
    assert all(k["answer"] == "12" and k["source"] == "student" for k in kept)


def test_student_samples_are_k_per_problem_and_seeded(tok):
    model = tiny("gpt2", tok, seed=6)
    problems = toy_splits()["train"][:3]
    settings = SamplingSettings(method="temperature", tau=1.0, max_new_tokens=6, answer_tokens=2, batch_size=4, seed=2)
    a = sample_student(model, tok, problems, 2, settings, progress=False)
    b = sample_student(model, tok, problems, 2, settings, progress=False)
    assert [r["id"] for r in a] == [p["id"] for p in problems for _ in range(2)]
    assert [r["sample"] for r in a] == [0, 1] * 3
    assert a == b


def _stub_run(tmp_path, calls):
    """A stand-in for the sweep's Run: real splits and paths layout, a ``_distill`` that records its calls."""
    from antidistill.experiment.rundir import RunDir

    cfg = load_config(SweepConfig, QUICK, ["distillers=[naive, {kind: warm_start, n_clean: 4}]"])

    def _distill(rows, seed, student_dir, **kw):
        calls.append({"rows": rows, "seed": seed, "dir": student_dir, **kw})
        student_dir.mkdir(parents=True)

    return SimpleNamespace(cfg=cfg, splits=toy_splits(), paths={"student": "unused"}, tok={}, progress=False,
                           files=RunDir(tmp_path), _distill=_distill)


def test_warm_start_trains_on_clean_solutions_first_and_distillation_starts_from_that_student(tmp_path):
    calls = []
    run = _stub_run(tmp_path, calls)
    stages = DistillerStages(run)
    d = WarmStart(n_clean=4)
    traces = _traces(6)
    stages.distill_student(d, stages.train_rows(d, traces, 0), 0, tmp_path / "point_student")
    warm, main = calls
    assert [r["completion"] for r in warm["rows"]] == [r["completion"] for r in clean_set(toy_splits()["train"], 4, 0)]
    assert warm["dir"] == tmp_path / "distillers" / "warm_start" / "student_s0"
    assert main["start"] == str(warm["dir"]) and main["rows"] == traces
    stages.distill_student(d, traces, 0, tmp_path / "point_student2")  # the warm student is made once per seed
    assert len(calls) == 3 and calls[2]["start"] == str(warm["dir"])


def test_answers_only_with_a_warm_start_samples_from_and_distils_that_student(tmp_path, monkeypatch):
    import antidistill.experiment.distiller_stages as stages_module

    calls, loaded = [], []
    run = _stub_run(tmp_path, calls)
    run.tok = {"student": None}
    stages = DistillerStages(run)
    d = AnswersOnly(k=2, few_shot=0, warm_start=4)
    train = toy_splits()["train"]

    def fake_samples(model, tokenizer, problems, k, settings, **kw):  # every sample reaches the label
        return [{"id": p["id"], "question": p["question"], "completion": f"{p['answer']} .", "forced_answer":
                 str(p["answer"]), "sample": i} for p in problems for i in range(k)]

    monkeypatch.setattr(stages_module, "load_causal_lm", lambda path: loaded.append(str(path)) or object())
    monkeypatch.setattr(stages_module, "sample_student", fake_samples)
    teacher = [{"id": p["id"], "forced_answer": str(p["answer"])} for p in train[:3]]
    rows = stages.train_rows(d, teacher, 0)
    warm_dir = tmp_path / "distillers" / "answers_only" / "student_s0"
    warm, = calls
    assert warm["dir"] == warm_dir  # fine-tuned first on the 4 clean solutions ...
    assert [r["completion"] for r in warm["rows"]] == [r["completion"] for r in clean_set(train, 4, 0)]
    assert loaded == [str(warm_dir)]  # ... and that student samples
    assert len(rows) == 2 * 3 and {r["id"] for r in rows} == {t["id"] for t in teacher}
    stages.distill_student(d, rows, 0, tmp_path / "point_student")
    assert calls[1]["start"] == str(warm_dir) and calls[1]["rows"] == rows  # ... and is distilled
    base = AnswersOnly(k=2)  # warm_start 0: the base student samples and is distilled, with no warm-up
    assert stages.n_warm(base) == 0 and stages.start_student(base, 0) == "unused"


def test_warm_start_changes_the_student(tmp_path, tok):
    base = tiny("gpt2", tok, seed=4)
    warm, _ = distill(copy.deepcopy(base), tok, clean_set(toy_splits()["train"], 8, 0),
                      DistillConfig(epochs=1.0, batch_size=4), output_dir=tmp_path / "w")
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), warm.parameters()))


def test_distillers_config_names_defaults_and_errors(tmp_path):
    cfg = load_config(SweepConfig, QUICK)
    assert [d.kind for d in cfg.distillers] == ["naive"]
    assert "distillers" not in config_text(cfg)  # a config without distillers writes the config.yaml it always did
    # nor the default calibration.gammas (proxy_mix's γ grid, added later), nor issue 16's unset zoo and arm_proxies
    default_gammas = "  gammas:\n  - 0.0\n  - 0.25\n  - 0.5\n  - 0.75\n  - 1.0\n"
    assert config_text(cfg) == dump_yaml(cfg).replace("distillers:\n- kind: naive\n", "").replace(
        default_gammas, "").replace("  zoo: null\n", "").replace("arm_proxies: []\n", "").replace(
        "distill_at:\n  targets: null\n  arms: null\n", "").replace(
        "replicate:\n  targets: []\n  seeds: []\n", "").replace("gate_from: null\n", "")
    cfg = load_config(SweepConfig, QUICK, ["distillers=[naive, clean_mix, {kind: answers_only, k: 2}]"])
    assert cfg.distillers[1] == CleanMix(fraction=0.1) and cfg.distillers[2] == AnswersOnly(k=2)
    assert "distillers" in config_text(cfg)
    for bad, needle in [("[bogus]", "bogus"), ("[naive, naive]", "more than once"), ("[]", "at least one"),
                        ("[{kind: clean_mix, fraction: 2}]", "fraction=2"), ("[{kind: harder, rank: 1}]", "unknown"),
                        ("[{kind: harder, lr: 0}]", "lr=0")]:
        with pytest.raises(ValueError, match=needle):
            load_config(SweepConfig, QUICK, [f"distillers={bad}"])


def test_a_setting_added_later_is_left_out_of_the_records_at_its_default(tmp_path):
    """A run directory recorded before ``answers_only`` had ``warm_start`` resumes: its config.yaml and its
    settings.json match the new default's records; a non-default value is recorded."""
    from antidistill.experiment.distiller_stages import check_distiller_settings
    from antidistill.experiment.distillers import distiller_record
    from antidistill.experiment.rundir import RunDir

    cfg = load_config(SweepConfig, QUICK, ["distillers=[naive, answers_only]"])
    assert "warm_start" not in config_text(cfg)
    files = RunDir(tmp_path)
    (files.distiller("answers_only")).mkdir(parents=True)
    old = {"few_shot": 3, "k": 4, "kind": "answers_only", "tau": 1.0}  # as written before warm_start existed
    (files.distiller("answers_only") / "settings.json").write_text(json.dumps(old, sort_keys=True))
    check_distiller_settings(files, cfg.distillers, write=False)
    warm = AnswersOnly(warm_start=64)
    assert distiller_record(warm)["warm_start"] == 64
    with pytest.raises(ValueError, match="records other settings"):
        check_distiller_settings(files, [warm], write=False)


def test_with_distiller_places_the_column_after_seed():
    row = with_distiller({"method": "m", "param": 1.0, "seed": 0, "student_acc": 0.5}, "naive")
    assert list(row) == ["method", "param", "seed", "distiller", "student_acc"] and row["distiller"] == "naive"


def test_distiller_table_gives_each_distillers_gap_and_the_recovered_share():
    df = pd.DataFrame({"distiller": ["naive"] * 4 + ["correct_only"] * 4 + [None] * 0,
                       "method": ["temperature", "whitebox"] * 4, "gap": [0.0, -0.08, 0.0, -0.08,
                                                                         0.0, -0.02, 0.0, -0.02]})
    seen = []

    def estimator(runs, arm):  # a stand-in: the mean of the arm's "gap" column
        seen.append((tuple(sorted(set(runs.distiller))), arm))
        sub = runs[runs.method == arm]
        e = float(sub.gap.mean())
        return {"estimate": e, "ci_low": e - 0.01, "ci_high": e + 0.01, "n_runs": len(runs)}

    table = distiller_table(df, estimator, arms=("whitebox",))
    assert seen == [(("naive",), "whitebox"), (("correct_only",), "whitebox")]  # one distiller's runs at a time
    assert list(table.distiller) == ["naive", "correct_only"]
    assert table.estimate.tolist() == pytest.approx([-0.08, -0.02])
    assert table.recovered.tolist() == pytest.approx([0.0, 0.75])
    assert recovered_fraction(-0.02, 0.01) != recovered_fraction(-0.02, 0.01)  # no naive gap: NaN
    # where higher is worse (NLL) the gap that hurts is positive: the same shares with the sign turned
    assert recovered_fraction(0.75, 0.5, harm=+1) == -0.5 and recovered_fraction(0.125, 0.5, harm=+1) == 0.75
    assert recovered_fraction(0.1, -0.5, harm=+1) != recovered_fraction(0.1, -0.5, harm=+1)  # NLL fell: NaN
    with pytest.raises(ValueError, match="harm"):
        recovered_fraction(0.1, 0.2, harm=0)
    with pytest.raises(ValueError, match="harm"):
        recovered_fraction(0.1, 0.2, harm=True)
    nll = distiller_table(df.assign(gap=-df.gap), estimator, arms=("whitebox",), harm=+1)
    assert nll.recovered.tolist() == pytest.approx([0.0, 0.75])
    assert table.arm_level.isna().all()  # no level column asked for
    levels = distiller_table(df.assign(acc=[0.5, 0.1] * 2 + [0.6, 0.2] * 2), estimator, arms=("whitebox",),
                             level="acc")
    assert levels.arm_level.tolist() == pytest.approx([0.1, 0.2])
    assert levels.temperature_level.tolist() == pytest.approx([0.5, 0.6])
    lines = distiller_table_lines(levels)
    assert lines[0].endswith("students: arm / temperature (mean) |") and lines[2].endswith("| 10.0 / 50.0 |")
    lines = distiller_table_lines(table)
    assert lines[2] == "| naive | whitebox | -8.0 [-9.0, -7.0] | 4 | 0% |"
    assert lines[3] == "| correct_only | whitebox | -2.0 [-3.0, -1.0] | 4 | 75% |"
    # rows without a distiller column are the naive distiller's; an arm that cannot be fitted is a dash
    naive_only = df[df.distiller == "naive"].drop(columns="distiller")
    t2 = distiller_table(naive_only, lambda r, a: None, arms=("whitebox",))
    assert t2.distiller.tolist() == ["naive"] and distiller_table_lines(t2)[2] == "| naive | whitebox | – | – | – |"


def test_the_report_puts_every_distiller_on_the_same_footing():
    """The report's table compares distillers on the worlds where the variants ran, at the primary target,
    without the slope adjustment (a variant has one temperature run per world): hand-computed differences."""
    from antidistill.experiment.report import _distiller_lines

    rows = []
    for w, (t5, ad5, adapt_t5, adapt_ad5) in {"w0": (0.40, 0.36, 0.50, 0.49), "w1": (0.30, 0.24, 0.44, 0.41)}.items():
        for method, target, x, y in [("temperature", -5.0, 0.85, t5), ("antidistill", -5.0, 0.86, ad5),
                                     ("temperature", -10.0, 0.80, t5 - 0.10), ("antidistill", -10.0, 0.80, t5 - 0.10)]:
            rows.append({"world": w, "seed": 0, "method": method, "target": target, "teacher_acc": x, "student_acc": y,
                         "n_test": 4000, "distiller": "naive"})
        for method, x, y in [("temperature", 0.85, adapt_t5), ("antidistill", 0.86, adapt_ad5)]:
            rows.append({"world": w, "seed": 0, "method": method, "target": -5.0, "teacher_acc": x, "student_acc": y,
                         "n_test": 4000, "distiller": "correct_only"})
    # a third world without the variants: left out of the table
    rows += [{**r, "world": "w2", "student_acc": r["student_acc"] - 0.3} for r in rows[:4]]
    lines = _distiller_lines(pd.DataFrame(rows))
    table = "\n".join(lines)
    # naive: mean of (0.36 − 0.40, 0.24 − 0.30) = −5.0 points; correct_only: mean of (−0.01, −0.03) = −2.0
    assert "| naive | antidistill | -5.0 [" in table and "| correct_only | antidistill | -2.0 [" in table
    assert "| correct_only | antidistill | -2.0 [" in table.split("| naive |")[-1] and "60%" in table  # 1 − (−2)/(−5)
    assert "not adjusted by a teacher-accuracy slope" in table


def test_the_distiller_table_fits_no_slope_on_seed_noise():
    """Two seeds at one target: the temperature runs differ in teacher accuracy by seed noise alone; the table's
    gap stays the plain paired difference (a slope fitted on them would blow it up)."""
    from antidistill.experiment.report import _distiller_lines

    rows = []
    for w in ("w0", "w1"):
        for seed, (xt, yt, ya) in enumerate([(0.85, 0.40, 0.37), (0.86, 0.45, 0.41)]):
            for d in ("naive", "correct_only"):
                rows += [{"world": w, "seed": seed, "method": "temperature", "target": -5.0, "teacher_acc": xt,
                          "student_acc": yt, "n_test": 4000, "distiller": d},
                         {"world": w, "seed": seed, "method": "antidistill", "target": -5.0, "teacher_acc": 0.80,
                          "student_acc": ya, "n_test": 4000, "distiller": d}]
    table = "\n".join(_distiller_lines(pd.DataFrame(rows)))
    assert "| naive | antidistill | -3.5 [" in table and "| correct_only | antidistill | -3.5 [" in table
