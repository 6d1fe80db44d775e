"""The finite-difference check of appendix B.1 (Fig. 7).

For a proxy and g, at several real positions, compare Δ̂ over the whole vocabulary with the exact
directional derivative ⟨∇θ log p(x), g⟩ computed by reverse-mode autograd, over a grid of ε and
dtypes. The error is the sine of the angle between the two vectors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..functional import sine_error
from ..gradient import load_gradient, trainable_parameters
from ..prompting import prompt_text
from ..proxy import ProxyDelta, position_ids
from .plotting import png_figure

DEFAULT_EPS_GRID = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def _eager(model):
    if getattr(model.config, "_attn_implementation", "eager") == "eager":
        return model
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


def autograd_directional_derivative(
    proxy, grad, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact ⟨∇θ log p(x | ids), g⟩ for every x at the last position, by reverse mode only.

    Uses the double-VJP identity: u ↦ J^T u is linear, so d/du ⟨J^T u, g⟩ = J g. Two backward
    passes give the whole ``(B, V)`` vector, in float32 (or the proxy's dtype).

    Args:
        input_ids: ``(B, L)``; attention_mask: ``(B, L)`` (left padding) or None.
    """
    model = _eager(proxy)  # double backward through fused SDPA kernels is not available everywhere
    params = trainable_parameters(model)
    gvec = load_gradient(grad, model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = position_ids(attention_mask)
    with torch.enable_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        u = torch.zeros_like(logp, requires_grad=True)
        names = list(params)
        vjp = torch.autograd.grad(logp, [params[n] for n in names], grad_outputs=u, create_graph=True, allow_unused=True)
        inner = sum((v.float() * gvec[n].to(v.device).float()).sum() for n, v in zip(names, vjp) if v is not None)
        (jg,) = torch.autograd.grad(inner, u)
    return jg.detach().float()


@dataclass
class FDCheckResult:
    rows: list[dict] = field(default_factory=list)  # one per (dtype, eps, difference): mean/max sine error

    def best_eps(self, dtype: str, difference: str = "central") -> float:
        cands = [r for r in self.rows if r["dtype"] == dtype and r["difference"] == difference]
        return min(cands, key=lambda r: r["mean_sine_error"])["eps"]


def fd_check(
    proxy,
    grad,
    input_ids: torch.Tensor,
    *,
    eps_grid: list[float] | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    differences: tuple[str, ...] = ("central", "forward"),
    attention_mask: torch.Tensor | None = None,
    include_jvp: bool = True,
) -> FDCheckResult:
    """Sine error of Δ̂ against autograd over ε × dtype × difference, at every position of ``input_ids``.

    ``proxy`` is left as it is: the float32 reference and each dtype's Δ̂ run on copies.

    Args:
        input_ids: ``(B, L)`` sequences; attention_mask: ``(B, L)``, 0 on left padding (default: none).
            Every prefix ending at a real token is one checked position.
    """
    eps_grid = eps_grid or DEFAULT_EPS_GRID
    grad = load_gradient(grad, proxy)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
    # the exact reference at every prefix, in float32
    prefixes = [(b, t) for b in range(input_ids.shape[0]) for t in range(1, input_ids.shape[1] + 1) if mask[b, t - 1]]
    ref = {}
    base = proxy if next(proxy.parameters()).dtype == torch.float32 else copy.deepcopy(proxy).float()
    for b, t in prefixes:
        ref[(b, t)] = autograd_directional_derivative(base, grad, input_ids[b : b + 1, :t], mask[b : b + 1, :t])[0]
    result = FDCheckResult()

    def record(engine, dtype, eps, difference):
        errs = []
        for b, t in prefixes:
            engine.reset()
            est = engine(input_ids[b : b + 1, :t], mask[b : b + 1, :t])[0]
            errs.append(float(sine_error(est, ref[(b, t)])))
        result.rows.append(
            dict(dtype=dtype, eps=eps, difference=difference,
                 mean_sine_error=sum(errs) / len(errs), max_sine_error=max(errs), n_positions=len(errs))
        )

    for dtype in dtypes:
        model = copy.deepcopy(base).to(getattr(torch, dtype))
        for difference in differences:
            for eps in eps_grid:
                record(ProxyDelta(model, grad, eps=eps, difference=difference), dtype, eps, difference)
        if include_jvp and dtype == "float32":
            record(ProxyDelta(copy.deepcopy(model), grad, eps=1.0, difference="jvp"),
                   dtype, float("nan"), "jvp")
        del model
    return result


def plot_fd_check(result: FDCheckResult, path) -> None:
    """Fig. 7: sine error against ε, one line per dtype and difference (PNG, written atomically)."""
    with png_figure(path) as (_fig, ax):
        keys = sorted({(r["dtype"], r["difference"]) for r in result.rows if r["difference"] != "jvp"})
        for dtype, diff in keys:
            rows = sorted((r for r in result.rows if r["dtype"] == dtype and r["difference"] == diff),
                          key=lambda r: r["eps"])
            ax.plot([r["eps"] for r in rows], [max(r["mean_sine_error"], 1e-12) for r in rows], marker="o",
                    label=f"{diff}, {dtype}")
        for r in result.rows:
            if r["difference"] == "jvp":
                ax.axhline(max(r["mean_sine_error"], 1e-12), ls="--", color="k", lw=1, label=f"JVP, {r['dtype']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ε")
        ax.set_ylabel("sine error vs autograd")
        ax.set_title("Finite-difference error of Δ̂ (cf. paper Fig. 7)")
        ax.legend(fontsize=8)


# a sweep's ε is far from the check's best beyond this factor (the check's grid is in decades)
EPS_TOLERANCE = 10.0


def eps_from_check(info: dict, dtype: str, eps: float) -> tuple[float, bool]:
    """The best ε an FD check (``holdout_fd_check``'s record) found for ``dtype``, and whether ``eps`` lies more
    than a factor :data:`EPS_TOLERANCE` from it.

    >>> eps_from_check({"best_eps_float32": 1e-3, "best_eps_bfloat16": 1e-2}, "float32", 0.02)
    (0.001, True)
    """
    best = info["best_eps_bfloat16" if dtype == "bfloat16" else "best_eps_float32"]
    return best, max(eps / best, best / eps) > EPS_TOLERANCE * (1 + 1e-9)


def holdout_fd_check(proxy, grad, tokenizer, traces: list[dict], plot_path) -> dict:
    """:func:`fd_check` at the last 8 tokens of ``traces`` (prompt + completion, on the teacher's ids, which the
    proxy reads); plots it to ``plot_path`` and returns the rows and the best ε per dtype (``fd_check.json``)."""
    ids = [tokenizer(prompt_text(tokenizer, r["question"]) + r["completion"], add_special_tokens=False)["input_ids"][-8:]
           for r in traces]
    width = min(map(len, ids))
    res = fd_check(proxy, grad, torch.tensor([x[-width:] for x in ids]))
    plot_fd_check(res, plot_path)
    return {"rows": res.rows, "best_eps_float32": res.best_eps("float32"), "best_eps_bfloat16": res.best_eps("bfloat16")}
