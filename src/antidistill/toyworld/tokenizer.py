"""A word-level tokenizer for the toy language, built locally and saved as a Hugging Face tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..prompting import ANSWER_FORCING, DEFAULT_SYSTEM_PROMPT

SPECIALS = ["<pad>", "<unk>", "<bos>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# words and numbers carry their leading space, so decoding is plain concatenation (Fuse)
PATTERN = r"\\boxed\{|\*\*| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\n| "
CHAT_TEMPLATE = (
    "<bos>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def render_chat(messages: list[dict[str, str]]) -> str:
    """``CHAT_TEMPLATE``'s text for ``messages``, without ``<bos>`` or a generation prompt: for
    chat-format text written before the tokenizer exists (a test checks the two agree)."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def build_tokenizer(texts: list[str], out_dir: str | Path):
    """Fit the vocabulary on ``texts`` and save a ``PreTrainedTokenizerFast`` to ``out_dir``."""
    pre = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIALS)}
    corpus = list(texts) + [DEFAULT_SYSTEM_PROMPT, ANSWER_FORCING] + [f" {n}" for n in range(0, 100)] + [str(n) for n in range(100)]
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<|end|>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast
