"""Answer extraction and math-verify scoring."""

from __future__ import annotations

import math


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
    from math_verify import parse, verify

    if not answer.strip():
        return False
    try:
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        ref = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        return bool(pred) and bool(ref) and bool(verify(ref, pred, timeout_seconds=None))
    except Exception:  # math-verify raises on pathological strings: that answer is wrong
        return False


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))
