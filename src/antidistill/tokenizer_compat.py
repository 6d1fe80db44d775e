"""Checks that teacher and proxy speak the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

MAX_LISTED = 5


def check_same_tokenizer(teacher_tokenizer, proxy_tokenizer) -> None:
    """Raise ``ValueError`` unless both tokenizers map the same strings to the same ids.

    Sizes are compared first (both are named in the error); then the vocabularies token by token,
    listing the first differences, so tokenizers of equal size but different content are caught.
    """
    tv, pv = teacher_tokenizer.get_vocab(), proxy_tokenizer.get_vocab()
    if len(tv) != len(pv):
        raise ValueError(
            f"teacher and proxy vocabularies differ: teacher has {len(tv)} tokens, proxy has {len(pv)}"
        )
    diffs = [f"{tok!r}: teacher {i} vs proxy {pv.get(tok)}" for tok, i in sorted(tv.items(), key=lambda x: x[1]) if pv.get(tok) != i]
    if diffs:
        more = f" (and {len(diffs) - MAX_LISTED} more)" if len(diffs) > MAX_LISTED else ""
        raise ValueError(
            f"teacher and proxy tokenizers differ in content ({len(tv)} tokens each): "
            + "; ".join(diffs[:MAX_LISTED])
            + more
        )


def check_vocab_sizes(teacher_model, proxy_model) -> None:
    """Raise ``ValueError`` naming both sizes if the models' output vocabularies differ."""
    t = teacher_model.get_output_embeddings().weight.shape[0]
    p = proxy_model.get_output_embeddings().weight.shape[0]
    if t != p:
        raise ValueError(f"teacher vocabulary size {t} differs from proxy vocabulary size {p}")


def load_tokenizer(path):
    """Load a tokenizer, honouring the class its ``tokenizer_config.json`` names.

    transformers 5.x ``AutoTokenizer`` picks the tokenizer class from a model folder's
    ``config.json`` (``model_type``) and rebuilds that class's pre-tokenizer, which silently
    changes a custom tokenizer saved beside a model (the toy world's word-level one beside its
    Qwen2 proxy, say). A tokenizer saved as a plain fast tokenizer is loaded as one.
    """
    cfg = Path(str(path)) / "tokenizer_config.json"
    if cfg.is_file():
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(path))
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {e}") from e
