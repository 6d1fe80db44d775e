"""The proxy gradient g = ∇θ ℓ(θ_P) (eq. 7): computed once, saved as safetensors, checked on load.

ℓ is the proxy's mean negative log-likelihood per *completion token* over a set of teacher
traces (system prompt and question masked out). The mean is over all completion tokens of
all traces on all processes, so g does not depend on batch size or process count: each
process sums token NLLs over its shard, divides by the global token count, and the
per-process gradients are summed across processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .functional import completion_nll
from .io_utils import atomic_path, provenance
from .progress import track
from .prompting import encode_example, pad_right

MAX_LISTED = 5


@dataclass
class ProxyGradient:
    """g with the facts about how it was made."""

    grad: dict[str, torch.Tensor]
    loss: float
    n_traces: int
    n_tokens: int
    proxy_name: str = ""
    n_processes: int = 1
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.grad.values())

    @property
    def norm(self) -> float:
        """‖g‖, the Euclidean norm over every parameter (it sets the scale on which ε acts)."""
        return grad_norm(self.grad)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters g is defined over: every parameter that requires grad (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _batches(examples: list[dict[str, list[int]]], batch_size: int, pad_id: int):
    for i in range(0, len(examples), batch_size):
        yield pad_right(examples[i : i + batch_size], pad_id)


def compute_proxy_gradient(
    proxy,
    tokenizer,
    traces: Sequence[Mapping],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    system_prompt: str | None = None,
    progress: bool = False,
) -> ProxyGradient:
    """Compute g = ∇θ of the proxy's mean completion-token NLL over ``traces`` (eq. 7).

    Args:
        proxy: a causal LM (``AutoModelForCausalLM``); left unchanged (its grads are zeroed after).
        tokenizer: the proxy's tokenizer, with a chat template.
        traces: mappings with ``"question"`` and ``"completion"`` (the teacher's trace).
        batch_size: examples per forward pass on each process. Does not change the result.
        max_length: truncate each example to this many tokens (completion tokens past it are dropped).
        system_prompt: the system message; the default is the project's.

    Inside a ``torch.distributed`` process group of N processes (``accelerate launch``, once
    accelerate's ``PartialState`` has joined it, as every command does), each takes every N-th trace
    and the result equals the single-process one (up to float summation order).

    Returns:
        :class:`ProxyGradient` with float32 tensors keyed by parameter name.
    """
    rank, world = _process_group()
    if len(traces) == 0:
        raise ValueError("traces is empty: the proxy gradient needs at least one teacher trace")
    shard = list(traces)[rank::world]
    examples = [encode_example(tokenizer, t["question"], t["completion"], system_prompt, max_length) for t in shard]
    device = next(proxy.parameters()).device
    local_tokens = sum(sum(1 for x in e["labels"] if x != -100) for e in examples)
    n_tokens = _all_sum(torch.tensor(float(local_tokens), device=device), world)
    if n_tokens.item() == 0:
        raise ValueError("the traces hold no completion tokens: every label is masked")

    params = trainable_parameters(proxy)
    was_training = proxy.training
    proxy.eval()  # no dropout: g must be a deterministic function of θ and the data
    proxy.zero_grad(set_to_none=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    local_nll = torch.zeros((), dtype=torch.float64, device=device)
    batches = list(_batches(examples, batch_size, pad_id))
    for ids, labels, mask in track(batches, "proxy gradient", enabled=progress and rank == 0):
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        nll = completion_nll(proxy(input_ids=ids, attention_mask=mask).logits, labels)
        (nll / n_tokens).backward()
        local_nll += nll.detach().double()
    total_nll = _all_sum(local_nll, world)
    grad = {}
    for name, p in params.items():
        g = p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        grad[name] = _all_sum(g, world)
    proxy.zero_grad(set_to_none=True)
    proxy.train(was_training)
    return ProxyGradient(
        grad={k: v.cpu() for k, v in grad.items()},
        loss=float(total_nll.item() / n_tokens.item()),
        n_traces=len(traces),
        n_tokens=int(n_tokens.item()),
        proxy_name=str(getattr(proxy.config, "_name_or_path", "") or type(proxy).__name__),
        n_processes=world,
    )


def _process_group() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def save_gradient(path: str | Path, result: ProxyGradient, extra: Mapping[str, str] | None = None) -> Path:
    """Write g atomically as safetensors; metadata records how it was made, and ‖g‖ (``grad_norm``)."""
    norm = check_gradient_values(result.grad)
    meta = {
        "proxy_name": result.proxy_name,
        "grad_norm": repr(norm),
        "n_params": str(result.n_params),
        "n_traces": str(result.n_traces),
        "n_tokens": str(result.n_tokens),
        "loss": repr(result.loss),
        "n_processes": str(result.n_processes),
        **{k: str(v) for k, v in provenance().items()},
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in result.grad.items()}, str(tmp), metadata=meta)
    return path


def read_gradient_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_gradient(source, proxy) -> dict[str, torch.Tensor]:
    """Load g (a path to ``.safetensors``, a :class:`ProxyGradient` or a dict) and check it against ``proxy``.

    Raises:
        ValueError: a name is missing or unexpected, a shape differs (the first mismatches are
            listed), a value is non-finite, or g is all zeros.
    """
    if isinstance(source, ProxyGradient):
        grad = dict(source.grad)
    elif isinstance(source, Mapping):
        grad = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"gradient file {str(path)!r} does not exist")
        with safe_open(str(path), framework="pt") as f:
            grad = {k: f.get_tensor(k) for k in f.keys()}
    expected = {n: tuple(p.shape) for n, p in trainable_parameters(proxy).items()}
    problems = [f"missing {n} {s}" for n, s in expected.items() if n not in grad]
    problems += [f"unexpected {n} {tuple(grad[n].shape)}" for n in grad if n not in expected]
    problems += [
        f"shape of {n}: gradient {tuple(grad[n].shape)} vs proxy {s}"
        for n, s in expected.items()
        if n in grad and tuple(grad[n].shape) != s
    ]
    if problems:
        where = f" in {str(source)!r}" if isinstance(source, (str, Path)) else ""
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise ValueError(f"gradient{where} does not match the proxy: {shown}{more}")
    check_gradient_values(grad)
    return grad


def random_direction(grad: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A seeded Gaussian direction in g's place: the baseline that asks whether g's *direction* matters.

    Every entry is drawn i.i.d. N(0, 1) (parameters in sorted name order, from one CPU
    ``torch.Generator`` seeded with ``seed``), then the whole direction is scaled to g's global L2 norm,
    so ε and λ act on it at g's scale. Unlike the permutation of Δ̂ (appendix A), which keeps each
    row's |Δ̂| values, this keeps nothing of g but its names, shapes, dtypes and ‖g‖.

    Args:
        grad: g, name → tensor (not all zero, finite).
        seed: any integer; the same seed gives the same direction.

    Returns:
        name → tensor, with ``grad``'s names (in its order), shapes and dtypes, on the CPU, and
        ‖r‖ = ‖g‖ (float64 accumulation; to the dtype's rounding).
    """
    norm = check_gradient_values(grad)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)
    draws = {n: torch.randn(tuple(grad[n].shape), generator=gen, dtype=torch.float64) for n in sorted(grad)}
    scale = norm / grad_norm(draws)
    return {n: (draws[n] * scale).to(grad[n].dtype) for n in grad}


def save_random_direction(path: str | Path, grad_path: str | Path, seed: int,
                          extra: Mapping[str, str] | None = None) -> Path:
    """Save :func:`random_direction` of the g saved at ``grad_path`` (safetensors), with that g's facts, the
    seed and ``extra`` in the metadata, atomically."""
    with safe_open(str(grad_path), framework="pt") as f:
        grad, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    result = ProxyGradient(random_direction(grad, seed), loss=float("nan"), n_traces=int(meta.get("n_traces", 0)),
                           n_tokens=int(meta.get("n_tokens", 0)), proxy_name=meta.get("proxy_name", ""))
    return save_gradient(path, result, extra={"direction": f"random Gaussian scaled to the norm of {Path(grad_path).name}",
                                              "seed": str(seed), **(extra or {})})


def grad_norm(grad: Mapping[str, torch.Tensor]) -> float:
    """‖g‖ over every tensor of ``grad``, accumulated in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in grad.values()))


def recorded_grad_norm(path: str | Path, proxy) -> float:
    """‖g‖ of the g saved at ``path``, as recorded with it (computed from the file, checked against ``proxy``,
    for a g saved before the norm was recorded)."""
    norm = read_gradient_metadata(path).get("grad_norm")
    return float(norm) if norm is not None else grad_norm(load_gradient(path, proxy))


def check_gradient_values(grad: Mapping[str, torch.Tensor]) -> float:
    """Raise ``ValueError`` if g holds a non-finite value or is all zeros; return ‖g‖."""
    bad = [n for n, t in grad.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"gradient has non-finite values in {bad[:MAX_LISTED]}")
    norm = grad_norm(grad)
    if norm == 0.0:
        raise ValueError("gradient is all zeros: Δ̂ would be 0 and antidistillation sampling would do nothing")
    return norm
