"""Toy-world pretraining text: correct arithmetic, never the task, and long enough packing."""

from __future__ import annotations

import re

from antidistill.prompting import encode_example
from antidistill.toyworld.build import ToyWorldConfig, _generic_examples
from antidistill.toyworld.task import ITEMS, NAMES, chat_arithmetic, make_splits

from helpers_world import toy_tokenizer_dir


def test_chat_arithmetic_is_correct_and_is_not_the_task():
    lines = chat_arithmetic(0, 300, "Think step by step.")
    assert len(lines) == 300 and len(set(lines)) > 200
    for line in lines:
        m = re.fullmatch(r"(?:<\|system\|>Think step by step\.<\|end\|>)?<\|user\|>(.+) = \?<\|end\|>"
                         r"<\|assistant\|>(.+) So it is (\d+) \.<\|end\|>", line)
        assert m, line
        expr, steps, final = m.group(1), m.group(2), int(m.group(3))
        assert eval(expr) == final  # noqa: S307 -- digits, + and - only (checked next)
        assert re.fullmatch(r"[0-9 +-]+", expr)
        value = int(expr.split()[0])
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+) \.", steps):
            assert int(a) == value and int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            value = int(c)
        assert value == final
        words = set(re.findall(r"[A-Za-z]+", line))
        assert not words & (set(NAMES) | set(ITEMS)), "a word problem leaked into generic text"
        assert "Final Answer" not in line


def test_pretraining_packs_are_longer_than_every_task_example(tmp_path):
    """Every position a distilled student reads was trained in pretraining (GPT-2 learns absolute positions)."""
    from antidistill.tokenizer_compat import load_tokenizer

    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    pack = ToyWorldConfig().pack_length
    longest = max(len(encode_example(tok, r["question"], r["solution"])["input_ids"])
                  for rows in make_splits(0, 200, 50).values() for r in rows)
    assert longest < pack
    lines = chat_arithmetic(1, 200, "Think step by step.")
    packs = _generic_examples(tok, lines, pack_to=pack)
    assert all(len(p["input_ids"]) <= pack + 1 for p in packs)
    assert max(len(p["input_ids"]) for p in packs) > pack - 40  # packed, not one line per sequence
    assert sum(len(p["input_ids"]) - 2 for p in packs) == sum(len(tok(x, add_special_tokens=False)["input_ids"])
                                                              for x in lines)


def test_render_chat_agrees_with_the_tokenizers_chat_template(tmp_path):
    """Chat-format pretraining text is written before the tokenizer exists; it must be what the
    saved chat template produces, or the student pretrains on a format it never sees again."""
    from antidistill.tokenizer_compat import load_tokenizer
    from antidistill.toyworld.tokenizer import render_chat

    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    for messages in ([{"role": "user", "content": "3 + 4 = ?"}],
                     [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "3 + 4 = ?"},
                      {"role": "assistant", "content": "3 + 4 = 7 . So it is 7 ."}]):
        assert "<bos>" + render_chat(messages) == tok.apply_chat_template(messages, tokenize=False)
