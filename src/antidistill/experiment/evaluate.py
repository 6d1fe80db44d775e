"""Accuracy with confidence intervals, and the student's NLL on ground-truth solutions."""

from __future__ import annotations

import torch

from ..prompting import encode_example, pad_right
from .scoring import wilson_interval


def accuracy_summary(rows: list[dict]) -> dict:
    k, n = sum(bool(r["correct"]) for r in rows), len(rows)
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "n": n}


@torch.no_grad()
def mean_completion_nll(model, tokenizer, rows: list[dict], *, batch_size: int = 32,
                        system_prompt: str | None = None) -> float:
    """Mean NLL per completion token of ``rows`` (``question``/``solution``) under ``model``."""
    examples = [encode_example(tokenizer, r["question"], r["solution"], system_prompt) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        ids, labels, mask = pad_right(examples[i : i + batch_size], pad)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, :-1].float()
        target = labels[:, 1:].to(model.device)
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((target != -100).sum())
    return total / max(count, 1)
