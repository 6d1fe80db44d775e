"""``antidistill serve --engine vllm``: vLLM's own OpenAI server, locked down to the antidistillation security model.

Design (B of issue #9): vLLM's server, engine and scheduler run unchanged; antidistillation enters as
the composite model (``output="eq11"``), :class:`~antidistill.engines.vllm.processor.ServeLogitsProcessor`
and the :func:`guard` middleware. How each rule of the security model is kept:

- **Only q or a flattening of it.** The model's logits *are* τ·eq. 11; the raw teacher logits never
  leave ``compute_logits``. ``validate_params`` sets every request's temperature to max(T, τ), so
  T < τ (0 and omitted included: ``--override-generation-config {"temperature": 0}``) samples q and
  T ≥ τ samples q^(τ/T). Temperature divides the whole eq. 11 logit.
- **Processed logprobs only** (``--logprobs-mode processed_logprobs``); prompt logprobs are refused.
- **Operator-only fields and ``logit_bias`` get a 400**: top-level body fields in :func:`guard`,
  ``vllm_xargs`` in ``validate_params`` (vLLM turns its errors into 400s). Penalties are refused too.
- **The key is required**: the launcher refuses to start without one; :func:`guard` checks it on every
  path but ``/health`` (vLLM's own check covers only ``/v1``-like prefixes), and only
  ``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` are served at all.
- **The one serving policy** (:class:`antidistill.serving_policy.ServingPolicy`, built from
  ``ServeConfig`` and handed to this process as JSON in ``ANTIDISTILL_VLLM_POLICY``): :func:`guard`
  caps bodies (413) and their arrival time (408), answers 400 to deeply nested JSON (never the
  exception's text), and runs ``policy.check`` on every generation body before vLLM sees it: refused
  fields, n/best_of, prompt-list length, the work bound, roles, logprobs, stop strings, ranges. It
  then writes the policy's ``max_tokens`` into the body, so vLLM never decodes more than the policy allows.
- **A non-finite eq. 11 row never falls back to the teacher**: ``ServeLogitsProcessor`` lets that row
  emit only EOS, so the request ends. vLLM V1 has no per-request error path out of the sampler, so
  the client sees ``finish_reason="stop"`` rather than an HTTP error (docs/vllm.md, limits).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from starlette.responses import JSONResponse

from ...serving_policy import PolicyError, ServingPolicy
from ...tokenizer_compat import load_tokenizer
from ...serve.connections import guarded_protocol
from ...serve.errors import APIError
from ...serve.middleware import RequestLimit
from ...serve.prompt import PromptEncoder
from .policy import POLICY_ENV, SERVE_MIN_TOP_P_ENV, SERVE_TAU_ENV

SERVED_PATHS = frozenset({"/health", "/v1/models", "/v1/completions", "/v1/chat/completions"})
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
KEY_ENV = "VLLM_API_KEY"  # vLLM reads it too
MODEL_NAME_ENV = "ANTIDISTILL_VLLM_MODEL_NAME"  # /v1/models answers this name only, never a path
TOKENIZER_ENV = "ANTIDISTILL_VLLM_TOKENIZER"  # the served tokenizer's directory, for text prompts
MAX_MODEL_LEN_ENV = "ANTIDISTILL_VLLM_MAX_MODEL_LEN"
GUARDED_PROTOCOL = None  # the connection guard's uvicorn protocol class, built by serve() from the policy


def policy_to_env(policy: ServingPolicy) -> str:
    """The policy's limits as JSON, for the server process (vLLM imports the guard by name)."""
    return json.dumps({k: v for k, v in asdict(policy).items() if k not in ("refused_fields", "role_aliases", "roles")})


_POLICY: list[ServingPolicy] = []
_ENCODER: list = []
_STARTED = int(time.time())


def current_policy() -> ServingPolicy:
    """The policy of this server process (``ANTIDISTILL_VLLM_POLICY``; the defaults if unset)."""
    if not _POLICY:
        raw = os.environ.get(POLICY_ENV)
        _POLICY.append(ServingPolicy(**json.loads(raw)) if raw else ServingPolicy())
    return _POLICY[0]


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


async def _read_body(request, policy: ServingPolicy):
    """The body, at most ``max_body_bytes`` within ``body_timeout_s``; else the 413/408 answer. Cached on the
    request (as ``Request.body`` caches it) so vLLM's handler reads it again from memory."""
    cap = policy.max_body_bytes
    too_big = _error(413, f"request body is larger than {cap} bytes", "invalid_request_error")
    try:
        if int(request.headers.get("content-length", "0")) > cap:
            return too_big
    except ValueError:
        return _error(400, "invalid Content-Length", "invalid_request_error")
    body = bytearray()
    try:
        async with asyncio.timeout(policy.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > cap:
                    return too_big
    except TimeoutError:
        return _error(408, f"the request body did not arrive within {policy.body_timeout_s:g} s",
                      "invalid_request_error")
    request._body = bytes(body)  # Starlette's own cache: BaseHTTPMiddleware replays it downstream
    return request._body


async def guard(request, call_next):
    """ASGI http middleware: path allow-list, API key, and the serving policy on every generation body."""
    path = request.url.path
    if path not in SERVED_PATHS:
        return _error(404, f"{path} is not served", "not_found")
    if path != "/health":
        key = os.environ.get(KEY_ENV, "")
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not key or not hmac.compare_digest(token.encode(), key.encode()):
            return _error(401, "a valid API key is required", "authentication_error")
    if path == "/v1/models" and request.method == "GET":  # vLLM's own answer names the model directory (root)
        name = os.environ.get(MODEL_NAME_ENV, "antidistill-teacher")
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": _STARTED,
                                                         "owned_by": "antidistill"}]})
    if request.method == "POST":
        policy = current_policy()
        body = await _read_body(request, policy)
        if isinstance(body, JSONResponse):
            return body
        try:
            data = json.loads(body) if body else {}
        except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        if path in ENDPOINTS:
            try:
                work = policy.check(data, ENDPOINTS[path])
            except PolicyError as e:
                return _error(400, e.message, "invalid_request_error", param=e.param)
            _apply(data, work, ENDPOINTS[path])
            refused = await asyncio.to_thread(_prompt_ids, data, work.max_tokens, ENDPOINTS[path])
            if refused is not None:
                return refused
            request._body = json.dumps(data).encode()
    return await call_next(request)


def _encoder() -> PromptEncoder:
    """The embedded server's prompt encoder, on the served tokenizer: the same text-stays-text rule."""
    if not _ENCODER:
        limit = int(os.environ.get(MAX_MODEL_LEN_ENV, "0")) or None
        cap = current_policy().max_prompt_tokens if limit is None else min(current_policy().max_prompt_tokens, limit - 1)
        _ENCODER.append(PromptEncoder(load_tokenizer(os.environ[TOKENIZER_ENV]), cap))
    return _ENCODER[0]


def _prompt_ids(data: dict, max_tokens: int, endpoint: str):
    """Tokenize the (policy-checked) prompt here, as the embedded server does, and hand vLLM the ids.

    A control-token string typed in a prompt or a message is those characters, never the control token
    (:class:`~antidistill.serve.prompt.PromptEncoder`: the chat template is rendered with markers in place
    of the contents, each content is encoded with special tokens split). Completions get the ids as their
    prompt; chat gets them as ``kv_transfer_params.prompt_token_ids``, vLLM's way to skip its own
    templating and tokenization (a client's own ``kv_transfer_params`` is refused by the policy). A prompt
    that leaves no room for ``max_tokens`` in ``max_model_len`` gets a 400 here. Returns the error response,
    or None."""
    enc = _encoder()
    limit = int(os.environ.get(MAX_MODEL_LEN_ENV, "0")) or None
    try:
        if endpoint == "chat":
            if data.get("echo"):
                return _error(400, "echo is not served for chat", "invalid_request_error", param="echo")
            batches = [enc.chat_ids(data["messages"])]
        else:
            texts = [data["prompt"]] if isinstance(data["prompt"], str) else data["prompt"]
            batches = [enc.completion_ids(t) for t in texts]
    except APIError as e:
        return _error(400, e.message, "invalid_request_error", param=e.param)
    for ids in batches:
        if limit is not None and len(ids) + max_tokens > limit:
            return _error(400, f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that is over this "
                               f"server's context of {limit} tokens", "invalid_request_error", param="max_tokens")
    if endpoint == "chat":
        data["kv_transfer_params"] = {"prompt_token_ids": batches[0]}
    else:
        data["prompt"] = batches[0] if isinstance(data["prompt"], str) else batches
    return None


class RequestLimitFromPolicy(RequestLimit):
    """:class:`~antidistill.serve.middleware.RequestLimit` with this process's policy (vLLM adds middleware
    classes by name, without arguments): a JSON 503 with Retry-After past ``max_requests``, /health exempt."""

    def __init__(self, app):
        p = current_policy()
        super().__init__(app, max_requests=p.max_requests, retry_after_s=p.retry_after_s)


def _apply(data: dict, work, endpoint: str) -> None:
    """Write what the policy allows into the body vLLM will parse: the capped token count, text content."""
    if endpoint == "chat":
        data.pop("max_tokens", None)
        data["max_completion_tokens"] = work.max_tokens
        data["messages"] = [dict(m) for m in work.messages]
    else:
        data["max_tokens"] = work.max_tokens


def server_argv(model_dir, *, host: str, port: int, model_name: str, max_model_len: int | None, max_num_seqs: int,
                kv_cache_memory_bytes: int | None, allow_logprobs: bool, dtype: str = "float32",
                policy: ServingPolicy | None = None) -> list[str]:
    argv = [
        "--model", str(model_dir), "--tokenizer", str(model_dir), "--served-model-name", model_name,
        "--host", host, "--port", str(port), "--dtype", dtype, "--enforce-eager",
        "--logits-processors", "antidistill.engines.vllm.processor:ServeLogitsProcessor",
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm", "--override-generation-config", json.dumps({"temperature": 0.0}),
        "--middleware", "antidistill.engines.vllm.server.guard",
        "--middleware", "antidistill.engines.vllm.server.RequestLimitFromPolicy",
        "--max-num-seqs", str(max_num_seqs), "--max-logprobs", "20" if allow_logprobs else "0",
        "--disable-uvicorn-access-log",
    ]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    return argv


def _install_connection_guard(policy: ServingPolicy) -> None:
    """Make uvicorn's default ("auto") HTTP protocol the connection guard of ``serve.connections`` (header
    timeout, per-client and total caps with idle eviction), in this process, which only runs this server."""
    import uvicorn.config

    global GUARDED_PROTOCOL
    GUARDED_PROTOCOL = guarded_protocol(policy)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GUARDED_PROTOCOL"


def serve(*, teacher, proxy, grad, lam: float, eps: float, tau: float, difference: str, host: str, port: int,
          api_key: str | None, policy: ServingPolicy | None = None, model_name: str = "antidistill-teacher",
          max_model_len: int | None = None, max_num_seqs: int = 32, workdir=".cache/antidistill/vllm-serve",
          kv_cache_memory_bytes: int | str | None = "auto", extra_args: list[str] | None = None) -> None:
    """Check everything, write the composite, and run vLLM's OpenAI server in this process (blocks).

    ``policy`` (``ServeConfig.policy()``; the defaults if None) bounds every request. ``max_model_len``
    defaults to :func:`~.setup.serve_max_model_len`: the policy's prompt + completion budget, limited to
    the teacher's and the proxy's positions.
    """
    from .setup import VllmSettings, check_models, prepare_cpu_env, require_vllm, serve_max_model_len, write_composite

    policy = policy or ServingPolicy()
    if not api_key:
        raise ValueError("--engine vllm requires --api-key (or ANTIDISTILL_API_KEY): the server never runs open")
    if teacher is None:
        raise ValueError("--engine vllm needs --teacher (the toy world's models are below vLLM's CPU head-size minimum)")
    settings = VllmSettings(lam=lam, eps=eps, tau=tau, difference=difference, output="eq11")
    if lam != 0.0 and (proxy is None or grad is None):
        raise ValueError("lam != 0 needs --proxy and --grad")
    require_vllm()
    check_models(teacher, proxy if lam != 0.0 else None)
    if max_model_len is None:
        max_model_len = serve_max_model_len(teacher, proxy if lam != 0.0 else None, policy.max_prompt_tokens,
                                            policy.max_tokens)
    prepare_cpu_env(multiprocessing=False)
    from .composite import register

    register()
    model_dir = write_composite(teacher, proxy, grad, settings, Path(workdir))
    if kv_cache_memory_bytes == "auto":
        from .setup import default_kv_bytes

        kv_cache_memory_bytes = default_kv_bytes()
    os.environ[SERVE_TAU_ENV] = repr(float(tau))
    os.environ[SERVE_MIN_TOP_P_ENV] = repr(float(policy.min_top_p))
    os.environ[POLICY_ENV] = policy_to_env(policy)
    os.environ[MODEL_NAME_ENV] = model_name
    os.environ[KEY_ENV] = api_key
    os.environ["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(max(1, round(policy.keep_alive_s)))  # vLLM's uvicorn reads it
    os.environ[TOKENIZER_ENV] = str(model_dir)
    os.environ[MAX_MODEL_LEN_ENV] = str(max_model_len)
    _POLICY.clear()
    _install_connection_guard(policy)
    argv = server_argv(model_dir, host=host, port=port, model_name=model_name, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, kv_cache_memory_bytes=kv_cache_memory_bytes,
                       allow_logprobs=policy.allow_logprobs, policy=policy) + ["--api-key", api_key] + list(extra_args or [])

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
