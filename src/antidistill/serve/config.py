"""Operator settings of the server, validated when built (a bad setting is a startup error)."""

from __future__ import annotations

import ipaddress
from dataclasses import field

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from ..serving_policy import ServingPolicy
from ..settings import CONFIG, Eq11Settings

# eq. 11's parameters unless the config says otherwise: about the demo's middle antidistillation point on
# the toy world (λ 0.006: 63% holdout teacher accuracy in docs/results/demo/calibration.json); calibrate λ
# per model. A partial ``sampling`` mapping fills in from these, so λ is never 0 by omission.
SERVE_SAMPLING = {"lam": 0.006}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(config=CONFIG)
class ServeConfig:
    """The operator's settings. λ, ε, τ and the difference mode (``sampling``) are never a request's:
    requests with T > τ sample q^(τ/T); T ≤ τ samples q itself."""

    teacher: str | None = Field(None, description="teacher path (default: the toy world's, built if missing)")
    proxy: str | None = Field(None, description="proxy path (default: the toy world's)")
    grad: str | None = Field(None, description="proxy gradient .safetensors (default: the toy world's)")
    sampling: Eq11Settings = field(default_factory=lambda: Eq11Settings(**SERVE_SAMPLING))
    min_top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                             description="the smallest nucleus a request gets: a request's top_p is raised to it. "
                                         "1 (the default) serves q whole: a tiny top_p would be greedy decoding "
                                         "of eq. 11, the near-clean trace the defense keeps from clients")
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(None, description="required bearer key (None: loopback only, or --insecure-no-auth)")
    insecure_no_auth: bool = Field(False, description="allow serving without a key on a non-loopback host")
    docs: bool = False  # serve /openapi.json (behind the key); off by default
    model_name: str = "antidistill-teacher"
    max_tokens: int = Field(256, ge=1)  # cap on a request's max_tokens
    max_prompt_tokens: int = Field(1024, ge=1)
    max_n: int = Field(1, ge=1, description="the largest n (and best_of) a request may ask for")
    max_prompts: int = Field(1, ge=1, description="the longest prompt list a /v1/completions request may send")
    max_work_tokens: int | None = Field(None, ge=1, description="bound on prompts x n x max_tokens x (1 + logprob "
                                        "entries per token); None: one request at max_tokens with full logprobs")
    max_body_bytes: int = Field(1 << 20, ge=1)  # larger bodies get 413 without being read
    body_timeout_s: float = Field(10.0, gt=0.0, allow_inf_nan=False)  # a body not in by then gets 408 (slowloris)
    header_timeout_s: float = Field(10.0, gt=0.0, allow_inf_nan=False,
                                    description="a connection whose request headers are not in by then is closed")
    keep_alive_s: float = Field(5.0, gt=0.0, allow_inf_nan=False, description="an idle keep-alive connection is "
                                "closed after this long")
    max_connections: int = Field(1024, ge=1, description="open connections; at the limit the oldest idle one is "
                                 "closed for a new one")
    max_connections_per_client: int = Field(64, ge=1, description="open connections per client address; beyond, "
                                            "the address's oldest idle one is closed")
    max_requests: int | None = Field(None, ge=1, description="HTTP requests in flight before a JSON 503 with "
                                     "Retry-After (/health excepted); None: max_queue + max_batch + 64")
    max_batch: int = Field(32, ge=1)  # requests decoding at once
    max_queue: int = Field(64, ge=1)  # waiting requests beyond this get 429
    retry_after_s: int = Field(1, ge=1)
    allow_logprobs: bool = True
    tokenizer_threads: int = Field(2, ge=1)  # tokenization runs here, off the event loop
    torch_threads: int | None = Field(None, ge=1)  # torch.set_num_threads for the process (None: torch's)
    drain_s: float = Field(3.0, ge=0.0, allow_inf_nan=False)  # on SIGTERM: in-flight requests get this long
    cache_dir: str = ".cache/antidistill"

    def policy(self) -> ServingPolicy:
        """The one request policy both servers enforce (``antidistill.serving_policy``)."""
        return ServingPolicy(
            max_body_bytes=self.max_body_bytes, body_timeout_s=self.body_timeout_s,
            header_timeout_s=self.header_timeout_s, keep_alive_s=self.keep_alive_s,
            max_connections=self.max_connections, max_connections_per_client=self.max_connections_per_client,
            max_requests=self.max_requests or self.max_queue + self.max_batch + 64, retry_after_s=self.retry_after_s,
            max_n=self.max_n, max_prompts=self.max_prompts, max_tokens=self.max_tokens,
            max_prompt_tokens=self.max_prompt_tokens, allow_logprobs=self.allow_logprobs,
            max_work_tokens=self.max_work_tokens, min_top_p=self.min_top_p)

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling_defaults(cls, v):
        return SERVE_SAMPLING | v if isinstance(v, dict) else v

    def __post_init__(self):
        if self.sampling.difference == "jvp" and self.sampling.lam != 0:
            raise ValueError("difference='jvp' cannot be served: per-request KV slots hold no dual (tangent) "
                             "caches; use difference='central' or 'forward'")
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ValueError("api_key is empty: give a real key, or omit it (loopback only)")
            if not self.api_key.isascii() or not self.api_key.isprintable():
                raise ValueError("api_key must be printable ASCII (it travels in an HTTP header)")
        elif not is_loopback(self.host) and not self.insecure_no_auth:
            raise ValueError(f"no api_key while serving on non-loopback host {self.host!r}: set api_key "
                             "(or ANTIDISTILL_API_KEY), or pass --insecure-no-auth to serve without one")
        self.policy()  # a policy that cannot be built is a startup error
