"""The transfer score of a proxy for a candidate student, on the teacher's holdout traces.

Each model's g is taken on the same holdout traces, on the teacher's token ids (eq. 7,
:func:`~antidistill.gradient.compute_proxy_gradient`). Each trace is then run once through the
teacher and through both models at θ ± εg (no KV cache, every position at once); at the completion
positions, :func:`antidistill.transfer.position_agreement` rank-correlates the two Δ̂ over the
teacher's top-p nucleus. The score is the mean ρ over positions; its 95% interval resamples traces.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from ..functional import check_eps, finite_difference_delta
from ..gradient import compute_proxy_gradient, load_gradient
from ..progress import track
from ..prompting import encode_example
from ..proxy import perturbed, to_width
from ..transfer import NUCLEUS_TOP_P, bootstrap_mean_interval, position_agreement


@dataclass(frozen=True)
class TransferScore:
    """The score, its interval and what it was computed on.

    Attributes:
        score: mean Spearman ρ over the used positions, in [−1, 1]: 1 when the two Δ̂ order the
            teacher's nucleus tokens alike, 0 when unrelated, −1 when reversed.
        low, high: 95% bootstrap interval over traces.
        n_positions: positions scored; n_skipped: completion positions skipped (fewer than 2 nucleus
            tokens, or a constant Δ̂ over the nucleus); n_traces: traces with a scored position.
        mean_nucleus: mean nucleus size over the scored positions.
    """

    score: float
    low: float
    high: float
    n_positions: int
    n_skipped: int
    n_traces: int
    mean_nucleus: float
    eps: float
    top_p: float

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"transfer score {self.score:+.3f} (95% CI {self.low:+.3f} to {self.high:+.3f}; Spearman over the "
                f"teacher's top-{self.top_p:g} nucleus at {self.n_positions} positions of {self.n_traces} traces, "
                f"{self.n_skipped} skipped)")


class SequenceDelta:
    """Δ̂ (central difference) of one model at every position of a sequence: θ ± εg, no cache."""

    def __init__(self, model: torch.nn.Module, grad: Mapping[str, torch.Tensor], eps: float):
        check_eps(eps)
        self.eps = float(eps)
        self.plus = perturbed(copy.deepcopy(model), grad, +self.eps).eval()
        self.minus = perturbed(copy.deepcopy(model), grad, -self.eps).eval()

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``(L,)`` ids → ``(L, V)`` float32 Δ̂ of the token after each position."""
        dev = next(self.plus.parameters()).device
        ids = ids[None].to(dev)
        return finite_difference_delta(self.plus(input_ids=ids).logits[0].float(),
                                       self.minus(input_ids=ids).logits[0].float(), self.eps, "central")


def holdout_gradient(model, grad, tokenizer, traces: Sequence[Mapping], *, progress: bool = False):
    """``grad`` loaded for ``model`` (a dict, :class:`~antidistill.ProxyGradient` or ``.safetensors``
    path), or, when None, g computed on ``traces`` with the teacher's ``tokenizer`` (eq. 7)."""
    if grad is None:
        grad = compute_proxy_gradient(model, tokenizer, traces, progress=progress)
    return load_gradient(grad, model)


def transfer_score(
    teacher,
    proxy,
    student,
    tokenizer,
    traces: Sequence[Mapping],
    *,
    proxy_grad=None,
    student_grad=None,
    eps: float = 1e-2,
    top_p: float = NUCLEUS_TOP_P,
    max_positions: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> TransferScore:
    """How well ``proxy``'s Δ̂ ranks the teacher's likely tokens as ``student``'s own Δ̂ does.

    Args:
        teacher, proxy, student: causal LMs that read the teacher's token ids (one vocabulary).
        tokenizer: the teacher's tokenizer (with its chat template).
        traces: the teacher's holdout traces, mappings with ``question`` and ``completion``.
        proxy_grad, student_grad: each model's g on these traces; None computes it here.
        eps: ε of the central difference.
        top_p: the teacher's nucleus mass.
        max_positions: score at most this many completion positions (traces in order); None: all.
        n_boot, seed: the bootstrap over traces.
    """
    check_eps(eps)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got top_p={top_p!r}")
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions!r}")
    if not traces:
        raise ValueError("traces is empty: the transfer score needs holdout traces")
    width = teacher.get_output_embeddings().weight.shape[0]
    models = {}
    for role, model, grad in (("proxy", proxy, proxy_grad), ("student", student, student_grad)):
        models[role] = SequenceDelta(model, holdout_gradient(model, grad, tokenizer, traces, progress=progress), eps)
    rhos, groups, sizes, skipped, left = [], [], [], 0, max_positions
    device = next(teacher.parameters()).device
    for t, trace in enumerate(track(list(traces), "transfer score", enabled=progress)):
        if left is not None and left <= 0:
            break
        ex = encode_example(tokenizer, trace["question"], trace["completion"])
        ids = torch.tensor(ex["input_ids"])
        # position j predicts token j + 1: score the positions whose next token is a completion token
        scored = torch.tensor([lab != -100 for lab in ex["labels"][1:]] + [False])
        if left is not None:
            keep = scored.cumsum(0) <= left
            scored &= keep
        with torch.no_grad():
            logp_t = torch.log_softmax(teacher(input_ids=ids[None].to(device)).logits[0].float(), -1).cpu()
        d_p = to_width(models["proxy"](ids), width).cpu()
        d_s = to_width(models["student"](ids), width).cpu()
        agree = position_agreement(d_p, d_s, logp_t, scored, top_p=top_p)
        rhos.append(agree.rho[agree.used])
        sizes.append(agree.nucleus_size[agree.used])
        groups.append(torch.full((agree.n_used,), t, dtype=torch.long))
        skipped += int(scored.sum()) - agree.n_used
        if left is not None:
            left -= int(scored.sum())
    rho, group, size = torch.cat(rhos), torch.cat(groups), torch.cat(sizes)
    if rho.numel() == 0:
        raise ValueError(f"no position of the {len(traces)} trace(s) has a teacher nucleus of 2 or more tokens "
                         f"(top_p={top_p}) with a non-constant Δ̂: nothing to score")
    low, high = bootstrap_mean_interval(rho, group, n_boot=n_boot, seed=seed)
    return TransferScore(score=float(rho.mean()), low=low, high=high, n_positions=int(rho.numel()),
                         n_skipped=skipped, n_traces=int(group.unique().numel()),
                         mean_nucleus=float(size.double().mean()), eps=float(eps), top_p=float(top_p))
