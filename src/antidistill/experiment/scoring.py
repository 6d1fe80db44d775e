"""Answer extraction and math-verify scoring."""

from __future__ import annotations

from math_verify import parse, verify


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


def is_correct(answer: str, gold: str) -> bool:
    """math-verify equivalence of ``\\boxed{answer}`` and the gold answer."""
    if not answer.strip():
        return False
    try:
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        ref = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        return bool(pred) and bool(ref) and bool(verify(ref, pred, timeout_seconds=None))
    except Exception:  # math-verify raises on pathological strings: that answer is wrong
        return False
