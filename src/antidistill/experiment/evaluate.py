"""Accuracy with confidence intervals, and the student's NLL on ground-truth solutions."""

from __future__ import annotations

import torch
from statsmodels.stats.proportion import proportion_confint

from ..functional import completion_nll
from ..prompting import encode_example, pad_right


def accuracy_summary(rows: list[dict]) -> dict:
    """Accuracy of ``rows`` (each with ``correct``) and its 95% Wilson score interval."""
    k, n = sum(bool(r["correct"]) for r in rows), len(rows)
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson") if n else (float("nan"), float("nan"))
    return {"accuracy": k / n if n else float("nan"), "ci_low": float(lo), "ci_high": float(hi), "n": n}


@torch.no_grad()
def mean_completion_nll(model, tokenizer, rows: list[dict], *, batch_size: int = 32,
                        system_prompt: str | None = None) -> float:
    """Mean NLL per completion token of ``rows`` (``question``/``solution``) under ``model``."""
    examples = [encode_example(tokenizer, r["question"], r["solution"], system_prompt) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        ids, labels, mask = (x.to(model.device) for x in pad_right(examples[i : i + batch_size], pad))
        total += completion_nll(model(input_ids=ids, attention_mask=mask).logits, labels).item()
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)
