"""Accuracy with confidence intervals, and the student's NLL on ground-truth solutions."""

from __future__ import annotations

import torch
from statsmodels.stats.proportion import proportion_confint

from ..functional import completion_nll
from ..prompting import ANSWER_FORCING, encode_example, pad_right


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


TOKEN_CLASSES = ("result", "reasoning", "final")


def token_classes(tokenizer, completion: str) -> list[str]:
    """The class of each token of ``completion`` (+ EOS) as :func:`encode_example` encodes it.

    ``final``: the final-answer block (from the answer-forcing text on, and EOS); ``result``: a
    number right after ``=`` (an arithmetic result); ``reasoning``: every other token.
    """
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    cut = completion.find(ANSWER_FORCING)
    cut = len(completion) if cut < 0 else cut
    out, prev = [], ""
    for (start, end) in enc["offset_mapping"]:
        text = completion[start:end]
        if start >= cut:
            out.append("final")
        elif prev.strip() == "=" and text.strip().isdigit():
            out.append("result")
        else:
            out.append("reasoning")
        prev = text
    if tokenizer.eos_token_id is not None:
        out.append("final")
    return out


def nll_by_token_class(model, tokenizer, rows: list[dict], *, batch_size: int = 32,
                       system_prompt: str | None = None) -> dict[str, float]:
    """Mean NLL per token of the ground-truth ``solution`` of ``rows``, split by :func:`token_classes`."""
    return solution_nll(model, tokenizer, rows, batch_size=batch_size, system_prompt=system_prompt)[1]


@torch.no_grad()
def solution_nll(model, tokenizer, rows: list[dict], *, batch_size: int = 32,
                 system_prompt: str | None = None) -> tuple[float, dict[str, float]]:
    """One pass over ``rows``: the mean NLL per completion token of the ground-truth ``solution``
    (exactly :func:`mean_completion_nll`) and its split by :func:`token_classes`."""
    examples = [encode_example(tokenizer, r["question"], r["solution"], system_prompt) for r in rows]
    classes = [token_classes(tokenizer, r["solution"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals = {c: 0.0 for c in TOKEN_CLASSES}
    counts = {c: 0 for c in TOKEN_CLASSES}
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        ids, labels, mask = (x.to(model.device) for x in pad_right(examples[i : i + batch_size], pad))
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(logits.float()[:, :-1].transpose(1, 2), labels[:, 1:],
                                                ignore_index=-100, reduction="none").cpu()  # 0 where no label
        labels = labels.cpu()
        total += float(nll.sum())  # completion_nll of the batch, from the same per-token losses
        count += int((labels[:, 1:] != -100).sum())
        for j, cls in enumerate(classes[i : i + batch_size]):
            pos = (labels[j, 1:] != -100).nonzero().flatten()  # completion tokens, in order
            for p, c in zip(pos.tolist(), cls):
                totals[c] += float(nll[j, p])
                counts[c] += 1
    by_class = {c: totals[c] / counts[c] if counts[c] else float("nan") for c in TOKEN_CLASSES}
    return total / max(count, 1), by_class
