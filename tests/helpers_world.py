"""A toy tokenizer and tiny toy-world models, built locally in a few seconds."""

from __future__ import annotations

import functools

from antidistill.toyworld.models import ModelSpec, build_model
from antidistill.toyworld.task import generic_text, make_splits
from antidistill.toyworld.tokenizer import build_tokenizer


@functools.lru_cache(maxsize=None)
def toy_tokenizer_dir(tmp_root: str) -> str:
    from pathlib import Path

    splits = make_splits(0, 60, 20)
    texts = [r["question"] + " " + r["solution"] for v in splits.values() for r in v] + generic_text(0, 50)
    out = Path(tmp_root) / "tok"
    build_tokenizer(texts, out)
    return str(out)


def toy_splits():
    return make_splits(0, 60, 20)


def tiny(family: str, tok, seed: int = 0):
    return build_model(ModelSpec(family, 16, 1, 2, 32), tok, seed).eval()
