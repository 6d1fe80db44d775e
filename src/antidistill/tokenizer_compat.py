"""Whether a proxy can read the teacher's token ids: tokenizer compatibility, and loading tokenizers.

The proxy scores the teacher's token ids (Δ̂ and g are both taken on them), so the two tokenizers
must agree on what each id the texts use means:

* every id of the teacher's ordinary vocabulary decodes to the same string in the proxy;
* control tokens (each tokenizer's added tokens: BOS/EOS/padding and the chat markers) map by
  role: an id that is a control token in the teacher must be one in the proxy too, whatever its
  string. DeepSeek-R1-Distill-Qwen-7B's ``<｜User｜>`` (151644) is Qwen2.5's ``<|im_start|>``.

Example (the paper's pair, with ``../shared/tokenizers``)::

    >>> match = check_compatible_tokenizers(load_tokenizer(r1_distill), load_tokenizer(qwen25))
    >>> match.summary()
    'compatible: 151,658 of 151,665 ids decode alike; 7 control ids map by role (151643-151649)'
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

MAX_LISTED = 5
DECODE_CHUNK = 4096  # ids decoded together when the decoders are compared


@dataclasses.dataclass(frozen=True)
class TokenizerMatch:
    """What :func:`check_compatible_tokenizers` found on a compatible pair."""

    n_teacher: int  # ids in the teacher's tokenizer
    n_same: int  # of those, ids whose strings are the same in both
    by_role: tuple[tuple[int, str, str], ...]  # control ids whose strings differ: (id, teacher's, proxy's)

    def summary(self) -> str:
        """One line: how many ids agree, and which control ids map by role."""
        line = f"compatible: {self.n_same:,} of {self.n_teacher:,} ids decode alike"
        if self.by_role:
            ids = [i for i, _, _ in self.by_role]
            span = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))
            line += f"; {len(ids)} control ids map by role ({span})"
        return line


def _tokens(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def _control_ids(tokenizer) -> set[int]:
    """Added tokens and the ids of the tokenizer's special-token roles (BOS, EOS, padding, unknown)."""
    ids = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids | {i for i in getattr(tokenizer, "all_special_ids", []) if i is not None}


def _listed(problems: list[str]) -> str:
    more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return "; ".join(problems[:MAX_LISTED]) + more


def check_compatible_tokenizers(teacher_tokenizer, proxy_tokenizer) -> TokenizerMatch:
    """Check that the proxy reads the teacher's ids as the teacher means them (see the module doc).

    Returns:
        a :class:`TokenizerMatch` (``summary()`` is one line for a log or the CLI).

    Raises:
        ValueError: naming the first ids that differ (id, the teacher's string, the proxy's), an
            ordinary id the proxy lacks, a control id that is ordinary text to the proxy, or ids
            that the two decoders turn into different strings.
    """
    t_tok, p_tok = _tokens(teacher_tokenizer), _tokens(proxy_tokenizer)
    t_ctl, p_ctl = _control_ids(teacher_tokenizer), _control_ids(proxy_tokenizer)
    problems, by_role, ordinary = [], [], []
    for i, t in enumerate(t_tok):
        if i >= len(p_tok):
            problems.append(f"id {i} ({t!r}) is past the proxy's {len(p_tok):,} ids")
            continue
        p = p_tok[i]
        if i in t_ctl and i in p_ctl:
            if t != p:
                by_role.append((i, t, p))
        elif t != p:
            kind = " (a control token in the teacher only)" if i in t_ctl else ""
            problems.append(f"id {i}: teacher {t!r} vs proxy {p!r}{kind}")
        else:
            ordinary.append(i)
    if problems:
        raise ValueError(f"teacher and proxy tokenizers are not compatible ({len(problems):,} of "
                         f"{len(t_tok):,} ids differ): {_listed(problems)}")
    for start in range(0, len(ordinary), DECODE_CHUNK):
        chunk = ordinary[start : start + DECODE_CHUNK]
        if teacher_tokenizer.decode(chunk) != proxy_tokenizer.decode(chunk):
            bad = [f"id {i}: teacher decodes {teacher_tokenizer.decode([i])!r}, proxy {proxy_tokenizer.decode([i])!r}"
                   for i in chunk if teacher_tokenizer.decode([i]) != proxy_tokenizer.decode([i])]
            raise ValueError("teacher and proxy tokenizers decode the same ids differently: "
                             + (_listed(bad) if bad else f"ids {chunk[0]}-{chunk[-1]} together"))
    return TokenizerMatch(len(t_tok), len(t_tok) - len(by_role), tuple(by_role))


def check_vocab_sizes(teacher_model, proxy_model, n_tokens: int | None = None) -> None:
    """Raise ``ValueError`` naming both sizes if the models' output vocabularies differ.

    With ``n_tokens`` (the teacher tokenizer's size) the widths may differ as long as both cover
    every token: rows past ``n_tokens`` are embedding padding that no text uses (R1-Distill-Qwen-7B
    has 152,064 rows, Qwen2.5-3B 151,936, both over 151,665 tokens); Δ̂ is 0 there.
    """
    t = teacher_model.get_output_embeddings().weight.shape[0]
    p = proxy_model.get_output_embeddings().weight.shape[0]
    if t == p:
        return
    if n_tokens is None or min(t, p) < n_tokens:
        cover = "" if n_tokens is None else f" (the tokenizer has {n_tokens:,} tokens)"
        raise ValueError(f"teacher vocabulary size {t} differs from proxy vocabulary size {p}{cover}")


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
