import pytest

from antidistill.generation import answer_forcing_prefix
from antidistill.experiment.evaluate import accuracy_summary
from antidistill.scoring import forced_answer, is_correct


def test_forced_answer_stops_at_matching_brace():
    assert forced_answer("42} and more") == "42"
    assert forced_answer("\\frac{1}{2}}\n") == "\\frac{1}{2}"
    assert forced_answer(" 7 ") == "7"  # ran out of tokens: take what is there


@pytest.mark.parametrize("ans, gold, ok", [("42", "42", True), ("42.0", "42", True), ("\\frac{1}{2}", "0.5", True),
                                           ("41", "42", False), ("", "42", False), ("}{", "42", False)])
def test_math_verify(ans, gold, ok):
    assert is_correct(ans, gold) is ok


def test_answer_forcing_cuts_the_models_own_final_answer():
    assert answer_forcing_prefix("2 + 3 = 5 .\n\n**Final Answer**\n\\boxed{5}") == "2 + 3 = 5 ."
    assert answer_forcing_prefix("no header here") == "no header here"


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    s = accuracy_summary([{"correct": i < k} for i in range(n)])
    return s["ci_low"], s["ci_high"]


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0


def test_the_integer_shortcut_agrees_with_math_verify():
    """Every pair of canonical integers, and near-misses around them, scores as math-verify alone scores it."""
    import random

    from antidistill import scoring

    rng = random.Random(0)
    ints = ["0", "7", "-7", "10", "100", "12345678901234567890"] + [str(rng.randint(-999, 999)) for _ in range(40)]
    near = ["007", "+7", "-0", "7.0", "1e2", "7 "]  # not canonical: these go to math-verify
    pairs = [(a, b) for a in ints + near for b in ints[:12]] + [(a, a) for a in ints]
    for a, b in pairs:
        pred = scoring.parse(f"\\boxed{{{a}}}", parsing_timeout=None)
        ref = scoring.parse(f"\\boxed{{{b}}}", parsing_timeout=None)
        expect = bool(pred) and bool(ref) and bool(scoring.verify(ref, pred, timeout_seconds=None))
        assert is_correct(a, b) is expect, (a, b)
