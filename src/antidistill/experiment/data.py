"""Datasets mapped to one schema: ``{id, question, solution, answer}``.

Toy world splits are generated; GSM8K, MATH and MMLU load from the Hugging Face hub or local files,
with a seeded shuffle before the 70/30 train/holdout split.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import datasets

from ..io_utils import read_jsonl
from ..scoring import forced_answer

SCHEMA = ("id", "question", "solution", "answer")


def _gsm8k_row(raw: dict, i: int, where: str) -> dict:
    if not isinstance(raw.get("question"), str) or not isinstance(raw.get("answer"), str) or "####" not in raw["answer"]:
        raise ValueError(f"{where}: row {i} is not a GSM8K row (needs 'question' and an 'answer' with '####'): {str(raw)[:120]}")
    solution, final = raw["answer"].rsplit("####", 1)
    final = final.strip().replace(",", "")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()
    return {"id": f"gsm8k-{i}", "question": raw["question"], "solution": f"{solution}\n\\boxed{{{final}}}", "answer": final}


def _math_row(raw: dict, i: int, where: str) -> dict:
    if not isinstance(raw.get("problem"), str) or not isinstance(raw.get("solution"), str) or "\\boxed{" not in raw["solution"]:
        raise ValueError(f"{where}: row {i} is not a MATH row (needs 'problem' and a 'solution' with \\boxed{{}})")
    ans = forced_answer(raw["solution"].rsplit("\\boxed{", 1)[1])
    return {"id": f"math-{i}", "question": raw["problem"], "solution": raw["solution"], "answer": ans}


def _mmlu_row(raw: dict, i: int, where: str) -> dict:
    letters = "ABCD"
    if not isinstance(raw.get("question"), str) or not isinstance(raw.get("choices"), list) or not isinstance(raw.get("answer"), int):
        raise ValueError(f"{where}: row {i} is not an MMLU row (needs 'question', 'choices' list and int 'answer')")
    q = raw["question"] + "\n" + "\n".join(f"{letters[j]}. {c}" for j, c in enumerate(raw["choices"]))
    ans = letters[raw["answer"]]
    return {"id": f"mmlu-{i}", "question": q, "solution": f"\\boxed{{{ans}}}", "answer": ans}


_ROW = {"gsm8k": _gsm8k_row, "math": _math_row, "mmlu": _mmlu_row}
DATASETS = tuple(_ROW)  # the real datasets; "toy" is the generated one
_HUB = {"gsm8k": ("openai/gsm8k", "main"), "math": ("EleutherAI/hendrycks_math", None), "mmlu": ("cais/mmlu", "all")}


def load_split_rows(name: str, split: str, path: str | Path | None = None) -> list[dict]:
    """Rows of ``name`` (gsm8k | math | mmlu) for ``split`` (train | test), in the common schema.

    ``path`` is a directory holding ``{split}.jsonl`` (e.g. the official GSM8K release); without it
    the dataset is loaded from the Hugging Face hub with ``datasets``.
    """
    if name not in _ROW:
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(_ROW)} or the toy world")
    if path is not None:
        f = Path(path) / f"{split}.jsonl"
        raw, where = read_jsonl(f), str(f)
    else:
        repo, cfg = _HUB[name]
        raw, where = list(datasets.load_dataset(repo, cfg, split=split)), f"{repo}:{split}"
    rows = [_ROW[name](r, i, where) for i, r in enumerate(raw, 1)]
    if not rows:
        raise ValueError(f"{where}: split {split!r} is empty")
    for r in rows:
        r["id"] = f"{split}-{r['id']}"
    return rows


def load_dataset_splits(name: str, path: str | Path | None = None, *, seed: int = 0, holdout_frac: float = 0.3,
                        limit_train: int | None = None, limit_test: int | None = None) -> dict[str, list[dict]]:
    """``train`` / ``holdout`` (a seeded shuffle, then 70/30) and ``test``."""
    pool = load_split_rows(name, "train", path)
    test = load_split_rows(name, "test", path)
    random.Random(seed).shuffle(pool)
    if limit_train:
        pool = pool[:limit_train]
    if limit_test:
        test = test[:limit_test]
    n_hold = int(round(holdout_frac * len(pool)))
    out = {"train": pool[n_hold:], "holdout": pool[:n_hold], "test": test}
    for k, v in out.items():
        if not v:
            raise ValueError(f"split {k!r} of {name} is empty")
    return out
