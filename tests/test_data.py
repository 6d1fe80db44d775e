from pathlib import Path

import pytest

from antidistill.experiment.data import load_dataset_splits, load_split_rows
from antidistill.toyworld.task import make_splits

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="shared GSM8K not present")
def test_gsm8k_local_files():
    splits = load_dataset_splits("gsm8k", GSM8K, seed=0)
    n_pool = len(splits["train"]) + len(splits["holdout"])
    assert n_pool == 7473 and len(splits["test"]) == 1319
    assert abs(len(splits["holdout"]) - 0.3 * n_pool) <= 1
    for r in splits["test"][:50] + splits["train"][:50]:
        assert set(r) == {"id", "question", "solution", "answer"}
        float(r["answer"])  # a number, commas removed
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}") and "<<" not in r["solution"]
    ids = lambda s: {r["id"] for r in s}  # noqa: E731
    assert not ids(splits["train"]) & ids(splits["holdout"])
    # a real seeded shuffle: reproducible, seed-dependent, and not the file order
    again = load_dataset_splits("gsm8k", GSM8K, seed=0)
    other = load_dataset_splits("gsm8k", GSM8K, seed=1)
    assert [r["id"] for r in again["holdout"]] == [r["id"] for r in splits["holdout"]]
    assert [r["id"] for r in other["holdout"]] != [r["id"] for r in splits["holdout"]]
    file_order = [r["id"] for r in load_split_rows("gsm8k", "train", GSM8K)]
    assert [r["id"] for r in splits["holdout"]] != file_order[: len(splits["holdout"])]


def test_malformed_row_names_file_and_row(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 3"}\n{"question": "q2"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "a #### 3"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl: row 2 is not a GSM8K row"):
        load_dataset_splits("gsm8k", tmp_path)
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 3"}\n{not json\n')
    with pytest.raises(ValueError, match=r"train\.jsonl: row 2 is not valid JSON"):
        load_dataset_splits("gsm8k", tmp_path)


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 3"}\n')
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="split 'test' is empty"):
        load_dataset_splits("gsm8k", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        load_split_rows("gsm9k", "train", "/tmp")


def test_math_and_mmlu_rows(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"problem": "1+1?", "solution": "It is $\\\\boxed{\\\\frac{1}{2}}$."}\n' * 4)
    (tmp_path / "test.jsonl").write_text('{"problem": "2+2?", "solution": "$\\\\boxed{4}$"}\n')
    s = load_dataset_splits("math", tmp_path)
    assert s["test"][0]["answer"] == "4" and s["train"][0]["answer"] == "\\frac{1}{2}"
    (tmp_path / "train.jsonl").write_text('{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}\n' * 4)
    (tmp_path / "test.jsonl").write_text('{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 0}\n')
    s = load_dataset_splits("mmlu", tmp_path)
    assert s["test"][0]["answer"] == "A" and "C. c" in s["train"][0]["question"]


def test_toy_splits_are_disjoint_and_seeded():
    a, b = make_splits(3, 300, 100), make_splits(3, 300, 100)
    assert a == b
    qs = {k: {r["question"] for r in v} for k, v in a.items()}
    assert not (qs["train"] & qs["holdout"]) and not (qs["train"] & qs["test"]) and not (qs["holdout"] & qs["test"])
    assert len(a["holdout"]) == 90 and len(a["train"]) == 210
    for r in a["train"]:
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}")
