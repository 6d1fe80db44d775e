import pytest

from antidistill.experiment.generation import answer_forcing_prefix
from antidistill.experiment.evaluate import accuracy_summary
from antidistill.experiment.scoring import forced_answer, is_correct


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
