"""Answer extraction and math-verify scoring."""

from __future__ import annotations

import functools
import re

from math_verify import parse, verify

# a canonical integer: no sign on 0, no leading zeros, no "+"; two of them are math-verify-equal iff
# they are the same string (tests/test_scoring.py checks this against math-verify itself)
_CANONICAL_INT = re.compile(r"-?[1-9][0-9]*|0")


def forced_answer(continuation: str) -> str:
    """The text the model wrote after the forced ``\\boxed{``, up to its matching ``}``."""
    depth, out = 1, []
    for ch in continuation:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        out.append(ch)
    return "".join(out).strip()


@functools.lru_cache(maxsize=1 << 16)
def is_correct(answer: str, gold: str) -> bool:
    """math-verify equivalence of ``\\boxed{answer}`` and the gold answer.

    Memoised, with a shortcut for two canonical integers (the toy task's answers): scoring was
    two thirds of a sweep point's generation time, each call parsing with sympy.
    """
    if not answer.strip():
        return False
    if _CANONICAL_INT.fullmatch(answer) and _CANONICAL_INT.fullmatch(gold):
        return answer == gold
    try:
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        ref = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        return bool(pred) and bool(ref) and bool(verify(ref, pred, timeout_seconds=None))
    except Exception:  # math-verify raises on pathological strings: that answer is wrong
        return False


ANSWER_HEADER = "**Final Answer**"
BOXED = "\\boxed{"


def written_answer(completion: str) -> str | None:
    """The answer a trace wrote in its own final block, or None if it has no ``**Final Answer**`` header.

    The block is read as written: the text after ``\\boxed{`` up to its matching ``}`` (or, if the
    block has no ``\\boxed{``, the text after the header up to the first unmatched ``}``). A block
    the sampler corrupted ("**Final Answer** 20}") therefore yields its corrupted answer.
    """
    i = completion.find(ANSWER_HEADER)
    if i < 0:
        return None
    block = completion[i + len(ANSWER_HEADER):]
    j = block.find(BOXED)
    return forced_answer(block[j + len(BOXED):] if j >= 0 else block.strip())


def close_answer(continuation: str) -> str:
    """A forced continuation up to and including the ``}`` that closes the forced ``\\boxed{``."""
    depth = 1
    for k, ch in enumerate(continuation):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return continuation[: k + 1]
    return continuation
