"""The student's NLL on ground-truth solutions: one pass gives the mean and its split by token class."""

import math

from antidistill.experiment.evaluate import TOKEN_CLASSES, mean_completion_nll, nll_by_token_class, solution_nll
from antidistill.tokenizer_compat import load_tokenizer

from helpers_world import tiny, toy_splits, toy_tokenizer_dir


def test_one_pass_equals_the_separate_mean_and_split(tmp_path):
    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    model = tiny("gpt2", tok)
    rows = toy_splits()["test"][:10]
    mean, by_class = solution_nll(model, tok, rows, batch_size=4)
    assert math.isclose(mean, mean_completion_nll(model, tok, rows, batch_size=3), rel_tol=1e-5)
    assert by_class == nll_by_token_class(model, tok, rows, batch_size=4)
    assert set(by_class) == set(TOKEN_CLASSES)
    assert all(math.isfinite(v) and v > 0 for v in by_class.values())
