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
  It also caps bodies at 1 MiB (413) and 10 s (408), which vLLM does not, and answers 400 to
  deeply nested JSON (never the exception's text).
- **A non-finite eq. 11 row never falls back to the teacher**: ``ServeLogitsProcessor`` lets that row
  emit only EOS, so the request ends. vLLM V1 has no per-request error path out of the sampler, so
  the client sees ``finish_reason="stop"`` rather than an HTTP error (docs/vllm.md, limits).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from pathlib import Path

from starlette.responses import JSONResponse

from .policy import MODE_KEY, OPERATOR_ONLY, SERVE_MIN_TOP_P_ENV, SERVE_TAU_ENV

SERVED_PATHS = frozenset({"/health", "/v1/models", "/v1/completions", "/v1/chat/completions"})
REJECTED_FIELDS = OPERATOR_ONLY | {"logit_bias", "prompt_logprobs", "use_beam_search", MODE_KEY}
KEY_ENV = "VLLM_API_KEY"  # vLLM reads it too
MAX_BODY_BYTES = 1 << 20  # as the embedded server (ServeConfig.max_body_bytes); vLLM itself has no cap
BODY_TIMEOUT_S = 10.0  # as ServeConfig.body_timeout_s: a body not in by then gets 408


def _error(status: int, message: str, kind: str):
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


async def _read_body(request):
    """The body, at most MAX_BODY_BYTES within BODY_TIMEOUT_S; else the 413/408 answer. Cached on the request
    (as ``Request.body`` caches it) so vLLM's handler reads it again from memory."""
    too_big = _error(413, f"request body is larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
    try:
        if int(request.headers.get("content-length", "0")) > MAX_BODY_BYTES:
            return too_big
    except ValueError:
        return _error(400, "invalid Content-Length", "invalid_request_error")
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return too_big
    except TimeoutError:
        return _error(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", "invalid_request_error")
    request._body = bytes(body)  # Starlette's own cache: BaseHTTPMiddleware replays it downstream
    return request._body


async def guard(request, call_next):
    """ASGI http middleware: path allow-list, API key, and a 400 for operator-only body fields."""
    path = request.url.path
    if path not in SERVED_PATHS:
        return _error(404, f"{path} is not served", "not_found")
    if path != "/health":
        key = os.environ.get(KEY_ENV, "")
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not key or not hmac.compare_digest(token.encode(), key.encode()):
            return _error(401, "a valid API key is required", "authentication_error")
    if request.method == "POST":
        body = await _read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            data = json.loads(body) if body else {}
        except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        if isinstance(data, dict):
            bad = sorted(k for k in data if str(k).lower() in REJECTED_FIELDS and data[k] is not None)
            if bad:
                return _error(400, f"field(s) {bad} cannot be set by a request (operator-only or unsupported)",
                              "invalid_request_error")
            prompt = data.get("prompt")
            if prompt is not None and not (isinstance(prompt, str)
                                           or (isinstance(prompt, list) and all(isinstance(x, str) for x in prompt))):
                return _error(400, "prompt must be text: token-id prompts could carry control tokens",
                              "invalid_request_error")
    return await call_next(request)


def server_argv(model_dir, *, host: str, port: int, model_name: str, max_model_len: int | None, max_num_seqs: int,
                kv_cache_memory_bytes: int | None, allow_logprobs: bool, dtype: str = "float32") -> list[str]:
    argv = [
        "--model", str(model_dir), "--tokenizer", str(model_dir), "--served-model-name", model_name,
        "--host", host, "--port", str(port), "--dtype", dtype, "--enforce-eager",
        "--logits-processors", "antidistill.engines.vllm.processor:ServeLogitsProcessor",
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm", "--override-generation-config", json.dumps({"temperature": 0.0}),
        "--middleware", "antidistill.engines.vllm.server.guard",
        "--max-num-seqs", str(max_num_seqs), "--max-logprobs", "20" if allow_logprobs else "0",
        "--disable-uvicorn-access-log",
    ]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    return argv


def serve(*, teacher, proxy, grad, lam: float, eps: float, tau: float, difference: str, host: str, port: int,
          api_key: str | None, model_name: str = "antidistill-teacher", max_model_len: int | None = None,
          max_num_seqs: int = 32, allow_logprobs: bool = True, min_top_p: float = 1.0,
          workdir=".cache/antidistill/vllm-serve",
          kv_cache_memory_bytes: int | str | None = "auto", extra_args: list[str] | None = None) -> None:
    """Check everything, write the composite, and run vLLM's OpenAI server in this process (blocks)."""
    from .setup import VllmSettings, check_models, prepare_cpu_env, require_vllm, write_composite

    if not api_key:
        raise ValueError("--engine vllm requires --api-key (or ANTIDISTILL_API_KEY): the server never runs open")
    if teacher is None:
        raise ValueError("--engine vllm needs --teacher (the toy world's models are below vLLM's CPU head-size minimum)")
    settings = VllmSettings(lam=lam, eps=eps, tau=tau, difference=difference, output="eq11")
    if lam != 0.0 and (proxy is None or grad is None):
        raise ValueError("lam != 0 needs --proxy and --grad")
    require_vllm()
    check_models(teacher, proxy if lam != 0.0 else None)
    prepare_cpu_env(multiprocessing=False)
    from .composite import register

    register()
    model_dir = write_composite(teacher, proxy, grad, settings, Path(workdir))
    if kv_cache_memory_bytes == "auto":
        from .setup import default_kv_bytes

        kv_cache_memory_bytes = default_kv_bytes()
    os.environ[SERVE_TAU_ENV] = repr(float(tau))
    os.environ[SERVE_MIN_TOP_P_ENV] = repr(float(min_top_p))
    os.environ[KEY_ENV] = api_key
    argv = server_argv(model_dir, host=host, port=port, model_name=model_name, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, kv_cache_memory_bytes=kv_cache_memory_bytes,
                       allow_logprobs=allow_logprobs) + ["--api-key", api_key] + list(extra_args or [])

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
