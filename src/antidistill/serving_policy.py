"""The serving policy: what one request may ask of an antidistillation server, as data, in one place.

Both servers, the embedded one (``antidistill serve``) and vLLM's (``--engine vllm``), build one
:class:`ServingPolicy` from ``ServeConfig`` and run :meth:`ServingPolicy.check` on every generation
request's JSON body before any other work (tokenization, queueing, decoding). A request outside the
policy gets a 400 that names the field and the limit. The policy covers:

- body size and the body, header and keep-alive timeouts, and connections (the servers enforce
  these at the connection; the numbers live here);
- ``n`` and ``best_of`` (1 unless the operator allows a few), the number of prompts in a list;
- ``max_tokens`` (capped at the operator's limit), logprobs, stop strings;
- the work bound: prompts × n × max_tokens × (1 + logprob entries per token) ≤ ``max_work_tokens``,
  so no single request can hold the server for much longer, or in much more memory, than the largest
  ordinary request;
- refused fields: the operator's eq. 11 settings (λ, ε, τ, the proxy, g), ``logit_bias``, and fields
  that would truncate or constrain the distribution (structured output, tools, allowed tokens);
- roles (system, user, assistant; ``developer`` is read as ``system``) and text-only content;
- temperature and top_p ranges (a request's top_p is raised to ``min_top_p``);
- a non-finite eq. 11 row is refused (:func:`antidistill.functional.refuse_nonfinite`).

Example:
    >>> p = ServingPolicy(max_tokens=64)
    >>> p.check({"model": "m", "prompt": "Ann has", "max_tokens": 500}, "completions").max_tokens
    64
    >>> p.check({"model": "m", "prompt": "Ann has", "n": 9}, "completions")
    Traceback (most recent call last):
    ...
    antidistill.serving_policy.PolicyError: n=9 is over this server's limit max_n=1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}
OPERATOR_ONLY = frozenset(
    {"lam", "lambda", "eps", "epsilon", "tau", "difference", "proxy", "grad", "gradient", "antidistill",
     "antidistillation"}
)
# fields that reshape, truncate or constrain the sampled distribution, reach the raw model, or are
# engine-internal: refused whatever their value (None and absent are fine)
REFUSED_FIELDS = OPERATOR_ONLY | frozenset(
    {"logit_bias", "prompt_logprobs", "use_beam_search", "antidistill_mode", "vllm_xargs", "allowed_token_ids",
     "bad_words", "chat_template", "chat_template_kwargs", "mm_processor_kwargs", "guided_json", "guided_regex",
     "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
     "structured_outputs", "tools", "tool_choice", "functions", "function_call", "return_tokens_as_token_ids",
     "return_token_ids", "prompt_embeds", "kv_transfer_params", "cache_salt", "documents",
     "continue_final_message", "add_generation_prompt", "prompt_token_ids"}
)
NONFINITE_RULES = ("refuse",)
INT64 = (-(2**63), 2**63 - 1)


class PolicyError(ValueError):
    """A request outside the policy: HTTP 400 naming ``param`` and the limit."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Work:
    """What a request that passed the policy asks for (the values a server must use)."""

    n: int
    prompts: int
    max_tokens: int
    logprob_entries: int  # per generated token: 0, or 1 + the number of top logprobs
    stop: list[str]
    messages: list[dict] | None = None  # chat: {"role", "content": str}, roles normalised

    @property
    def tokens(self) -> int:
        """The work bound's measure: prompts × n × max_tokens × (1 + logprob entries)."""
        return self.prompts * self.n * self.max_tokens * (1 + self.logprob_entries)


@dataclass(frozen=True)
class ServingPolicy:
    """Limits on one request, as data. ``max_work_tokens=None`` means one request at the largest size
    allowed with ``n = 1``: ``max_tokens × (2 + max_top_logprobs)``."""

    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024
    max_connections_per_client: int = 64
    max_requests: int = 160  # HTTP requests in flight; beyond, a JSON 503 with Retry-After (/health excepted)
    retry_after_s: int = 1
    max_n: int = 1
    max_prompts: int = 1
    max_tokens: int = 256
    default_completion_tokens: int = 16  # /v1/completions without max_tokens, as OpenAI
    max_prompt_tokens: int = 1024
    max_messages: int = 256
    allow_logprobs: bool = True
    max_top_logprobs: int = 20  # chat top_logprobs
    max_completion_logprobs: int = 5  # completions logprobs
    max_stop: int = 4
    max_stop_chars: int = 256
    max_work_tokens: int | None = None
    max_temperature: float = 2.0
    min_top_p: float = 1.0
    roles: tuple[str, ...] = ROLES
    role_aliases: dict = field(default_factory=lambda: dict(ROLE_ALIASES))
    refused_fields: frozenset = REFUSED_FIELDS
    nonfinite: str = "refuse"

    def __post_init__(self):
        for name in ("max_body_bytes", "max_connections", "max_connections_per_client", "max_requests", "max_n",
                     "max_prompts", "max_tokens", "max_prompt_tokens", "max_messages", "max_stop", "max_stop_chars",
                     "retry_after_s", "default_completion_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {name}={v!r}")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {name}={v!r}")
        if not 0 < self.min_top_p <= 1:
            raise ValueError(f"min_top_p must be in (0, 1], got min_top_p={self.min_top_p!r}")
        if self.max_work_tokens is not None and self.max_work_tokens < self.max_tokens:
            raise ValueError(f"max_work_tokens={self.max_work_tokens} is below max_tokens={self.max_tokens}: "
                             "no request could run at the token cap")
        if self.nonfinite not in NONFINITE_RULES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_RULES} (the teacher is never a fallback), "
                             f"got nonfinite={self.nonfinite!r}")

    @property
    def work_limit(self) -> int:
        if self.max_work_tokens is not None:
            return self.max_work_tokens
        return self.max_tokens * (2 + (self.max_top_logprobs if self.allow_logprobs else 0))

    # --- the check --------------------------------------------------------------------------------
    def check(self, body: dict, endpoint: str) -> Work:
        """Check a request body (parsed JSON) for ``endpoint`` ``"chat"`` or ``"completions"``.

        Returns:
            the :class:`Work` the server must use (``max_tokens`` capped, roles normalised).

        Raises:
            PolicyError: the first rule the body breaks, naming the field and the limit.
        """
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        if not isinstance(body, dict):
            raise PolicyError("the body must be a JSON object")
        bad = sorted(k for k in body if str(k).lower() in self.refused_fields and body[k] is not None)
        if bad:
            what = ("is operator-only: the antidistillation defense cannot be set per request"
                    if str(bad[0]).lower() in OPERATOR_ONLY else "cannot be set by a request (operator-only: it would "
                    "reshape or bypass the antidistillation distribution, or is engine-internal)")
            raise PolicyError(f"field {bad[0]!r} {what}", param=str(bad[0]))
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text" and len(rf) == 1):
            raise PolicyError("structured output (response_format other than {'type': 'text'}) is not served",
                              param="response_format")

        n = self._count(body, "n")
        best_of = self._count(body, "best_of")
        n = max(n, best_of)
        self._number(body, "temperature", 0.0, self.max_temperature, low_open=False)
        self._number(body, "top_p", 0.0, 1.0, low_open=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not INT64[0] <= seed <= INT64[1]):
            raise PolicyError("seed must be an integer in the int64 range", param="seed")
        stop = self._stop(body.get("stop"))

        if endpoint == "chat":
            messages = self._messages(body.get("messages"))
            prompts = 1
            key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            default = self.max_tokens
            logprobs = body.get("logprobs")
            top = body.get("top_logprobs")
            if logprobs not in (None, False, True):
                raise PolicyError("logprobs must be a boolean", param="logprobs")
            if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                                    or not 0 <= top <= self.max_top_logprobs):
                raise PolicyError(f"top_logprobs must be an integer from 0 to {self.max_top_logprobs}",
                                  param="top_logprobs")
            entries = (1 + (top or 0)) if (logprobs or top) else 0
            asked = bool(logprobs or top)
        else:
            messages = None
            prompts = self._prompts(body.get("prompt"))
            key, default = "max_tokens", self.default_completion_tokens
            lp = body.get("logprobs")
            if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                                   or not 0 <= lp <= self.max_completion_logprobs):
                raise PolicyError(f"logprobs must be an integer from 0 to {self.max_completion_logprobs}",
                                  param="logprobs")
            entries = 0 if lp is None else 1 + lp
            asked = lp is not None
        if asked and not self.allow_logprobs:
            raise PolicyError("logprobs are disabled by the operator", param="logprobs")
        asked_tokens = body.get(key)
        if asked_tokens is not None and (isinstance(asked_tokens, bool) or not isinstance(asked_tokens, int)
                                         or asked_tokens < 1):
            raise PolicyError(f"{key} must be an integer >= 1", param=key)
        max_tokens = min(asked_tokens or default, self.max_tokens)
        work = Work(n=n, prompts=prompts, max_tokens=max_tokens, logprob_entries=entries, stop=stop, messages=messages)
        if work.tokens > self.work_limit:
            raise PolicyError(
                f"this request asks for {work.tokens} token-steps (prompts {prompts} x n {n} x max_tokens {max_tokens} "
                f"x (1 + {entries} logprob entries)), over this server's limit max_work_tokens={self.work_limit}",
                param="max_tokens", code="work_limit_exceeded")
        return work

    # --- the rules, one per field ---------------------------------------------------------------------
    def _count(self, body: dict, name: str) -> int:
        v = body.get(name)
        if v is None:
            return 1
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PolicyError(f"{name} must be an integer >= 1", param=name)
        if v > self.max_n:
            raise PolicyError(f"{name}={v} is over this server's limit max_n={self.max_n}", param=name)
        return v

    @staticmethod
    def _number(body: dict, name: str, lo: float, hi: float, *, low_open: bool) -> None:
        v = body.get(name)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v > hi or v < lo or (low_open and v == lo):
            raise PolicyError(f"{name} must be a number in {'(' if low_open else '['}{lo:g}, {hi:g}]", param=name)

    def _stop(self, stop) -> list[str]:
        items = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
        if items is None or not all(isinstance(s, str) for s in items):
            raise PolicyError("stop must be a string or a list of strings", param="stop")
        if len(items) > self.max_stop:
            raise PolicyError(f"at most {self.max_stop} stop sequences are allowed (max_stop), got {len(items)}",
                              param="stop")
        if any(not 1 <= len(s) <= self.max_stop_chars for s in items):
            raise PolicyError(f"each stop sequence must have 1 to {self.max_stop_chars} characters (max_stop_chars)",
                              param="stop")
        return list(items)

    def _prompts(self, prompt) -> int:
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) > self.max_prompts:
                raise PolicyError(f"a list of {len(prompt)} prompts is over this server's limit "
                                  f"max_prompts={self.max_prompts}", param="prompt")
            return len(prompt)
        raise PolicyError("prompt must be text (a string, or a list of strings): token-id prompts could carry "
                          "control tokens", param="prompt")

    def _messages(self, messages) -> list[dict]:
        if not isinstance(messages, list) or not 1 <= len(messages) <= self.max_messages:
            raise PolicyError(f"messages must be a list of 1 to {self.max_messages} messages (max_messages)",
                              param="messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise PolicyError("each message must be an object", param=f"messages.{i}")
            role = self.role_aliases.get(m.get("role"), m.get("role"))
            if role not in self.roles:
                raise PolicyError(f"messages.{i}.role must be one of {list(self.roles) + list(self.role_aliases)}",
                                  param=f"messages.{i}.role")
            extra = sorted(set(m) - {"role", "content", "name"})
            if extra:
                raise PolicyError(f"messages.{i}: field {extra[0]!r} is not served", param=f"messages.{i}.{extra[0]}")
            out.append({"role": role, "content": self._text(m.get("content"), f"messages.{i}.content")})
        return out

    @staticmethod
    def _text(content, param: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise PolicyError("content must be text: a string or a list of {'type': 'text', 'text': ...} parts",
                          param=param)
