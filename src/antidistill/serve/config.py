"""Operator settings of the server, validated when built (a bad setting is a startup error)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from ..functional import check_difference, check_eps, check_lam, check_tau


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    teacher: str | None = None  # None: the toy world's teacher (built if missing)
    proxy: str | None = None
    grad: str | None = None
    lam: float = 0.008  # the toy world's mid-grid λ (see configs/demo.yaml); calibrate per model
    eps: float = 1e-2
    tau: float = 0.9  # the operator's τ: requests with T > τ sample q^(τ/T); T ≤ τ samples q
    difference: str = "central"  # "central" or "forward"; "jvp" cannot be served (no per-request dual caches)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no auth, allowed only on loopback or with insecure_no_auth
    insecure_no_auth: bool = False
    docs: bool = False  # serve /openapi.json (behind the key); off by default
    model_name: str = "antidistill-teacher"
    max_tokens: int = 256  # cap on a request's max_tokens
    max_prompt_tokens: int = 1024
    max_body_bytes: int = 1 << 20  # larger bodies get 413 without being read
    max_batch: int = 32  # requests decoding at once
    max_queue: int = 64  # waiting requests beyond this get 429
    retry_after_s: int = 1
    allow_logprobs: bool = True
    tokenizer_threads: int = 2  # tokenization runs here, off the event loop
    torch_threads: int | None = None  # torch.set_num_threads for the process (None: torch's default)
    drain_s: float = 3.0  # on SIGTERM: in-flight requests get this long, then are cancelled
    cache_dir: str = ".cache/antidistill"
    runs_dir: str = "runs"  # unused; kept for configs written for older versions

    def __post_init__(self):
        check_lam(self.lam)
        check_eps(self.eps)
        check_tau(self.tau)
        check_difference(self.difference)
        if self.difference == "jvp" and self.lam != 0:
            raise ValueError("difference='jvp' cannot be served: per-request KV slots hold no dual (tangent) "
                             "caches; use difference='central' or 'forward'")
        for name in ("port", "max_tokens", "max_prompt_tokens", "max_batch", "max_queue", "max_body_bytes",
                     "tokenizer_threads", "retry_after_s"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be a positive integer, got {name}={v!r}")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise ValueError(f"torch_threads must be a positive integer or None, got {self.torch_threads!r}")
        if not isinstance(self.drain_s, (int, float)) or not math.isfinite(self.drain_s) or self.drain_s < 0:
            raise ValueError(f"drain_s must be a finite number >= 0, got drain_s={self.drain_s!r}")
        if self.api_key is not None:
            if not isinstance(self.api_key, str) or not self.api_key.strip():
                raise ValueError("api_key is empty: give a real key, or omit it (loopback only)")
            if not self.api_key.isascii() or not self.api_key.isprintable():
                raise ValueError("api_key must be printable ASCII (it travels in an HTTP header)")
        elif not is_loopback(self.host) and not self.insecure_no_auth:
            raise ValueError(f"no api_key while serving on non-loopback host {self.host!r}: set api_key "
                             "(or ANTIDISTILL_API_KEY), or pass --insecure-no-auth to serve without one")
