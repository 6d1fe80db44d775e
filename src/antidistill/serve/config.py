"""Operator settings of the server."""

from __future__ import annotations

from dataclasses import dataclass

from ..functional import check_difference, check_eps, check_lam, check_tau


@dataclass
class ServeConfig:
    teacher: str | None = None  # None: the toy world's teacher (built if missing)
    proxy: str | None = None
    grad: str | None = None
    lam: float = 0.008  # the toy world's mid-grid λ (see configs/demo.yaml); calibrate per model
    eps: float = 1e-2
    tau: float = 0.9  # the operator's τ; requests can raise it, never lower it
    difference: str = "central"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "antidistill-teacher"
    max_tokens: int = 256  # cap on max_tokens
    max_prompt_tokens: int = 1024
    max_batch: int = 32
    max_queue: int = 64  # waiting requests beyond this get 429
    retry_after_s: int = 1
    batch_wait_ms: float = 10.0
    allow_logprobs: bool = True
    cache_dir: str = ".cache/antidistill"
    runs_dir: str = "runs"

    def __post_init__(self):
        check_lam(self.lam)
        check_eps(self.eps)
        check_tau(self.tau)
        check_difference(self.difference)
        for name in ("port", "max_tokens", "max_prompt_tokens", "max_batch", "max_queue"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be a positive integer, got {name}={v!r}")
