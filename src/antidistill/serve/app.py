"""An OpenAI-compatible server whose completions are antidistillation-sampled.

Request policy (the defense is the operator's, not the client's):

* λ, ε, the difference mode, the proxy and the gradient are set by the operator. A request that
  names any of them (``lam``, ``lambda``, ``eps``, ``epsilon``, ``difference``, ``proxy``, ``grad``,
  ``gradient``, ``antidistill``, ``antidistillation``) gets a 400, and so does ``logit_bias``. Other
  unknown fields are ignored, as OpenAI's own API does with fields it does not use.
* ``temperature`` can only make sampling *more* random than the operator's τ: the effective τ is
  max(temperature, τ_operator). ``temperature: 0`` asks for greedy decoding, which takes the
  argmax of eq. 11 at the operator's τ, so the defense still applies. A client cannot get the clean
  teacher by any setting.
* ``logprobs``/``top_logprobs``, when the operator enables them, are those of the distribution
  actually sampled: eq. 11 after top-p. They are never the teacher's raw distribution.
* ``n`` > 1 is not supported (400).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import ServeConfig
from .engine import BatchEngine, DoneEvent, GenRequest, QueueFull, TokenEvent

FORBIDDEN_FIELDS = {"lam", "lambda", "eps", "epsilon", "difference", "proxy", "grad", "gradient",
                    "antidistill", "antidistillation", "logit_bias"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be >= 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and not (0.0 <= v <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


def create_app(cfg: ServeConfig, engine: BatchEngine, tokenizer) -> FastAPI:
    app = FastAPI(title="antidistill", version="1")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        type_ = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            e.status, "invalid_request_error")
        return JSONResponse(error_body(e.message, type_, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{loc or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", loc), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {cfg.api_key}":
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queued, "antidistillation": engine.processor is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "antidistill"}]}

    def _check(body: _Common) -> None:
        extra = set((body.model_extra or {}).keys())
        bad = sorted(extra & FORBIDDEN_FIELDS)
        if bad:
            raise APIError(400, f"field {bad[0]!r} is operator-only: the antidistillation defense cannot be set "
                                "per request", param=bad[0])
        if body.model != cfg.model_name:
            raise APIError(400, f"model {body.model!r} does not exist; this server has {cfg.model_name!r}",
                           param="model", code="model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported; use n=1", param="n")

    def _gen_request(body, prompt_ids, max_tokens, logprobs, top_logprobs) -> GenRequest:
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; the limit is {cfg.max_prompt_tokens}",
                           param="messages" if isinstance(body, ChatRequest) else "prompt")
        if (logprobs or top_logprobs) and not cfg.allow_logprobs:
            raise APIError(400, "logprobs are disabled by the operator", param="logprobs")
        temperature = 1.0 if body.temperature is None else body.temperature
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        loop = asyncio.get_running_loop()
        return GenRequest(
            prompt_ids=prompt_ids, max_tokens=min(max_tokens or cfg.max_tokens, cfg.max_tokens),
            greedy=temperature == 0.0, tau=max(temperature, cfg.tau), top_p=body.top_p or 1.0, seed=body.seed,
            logprobs=bool(logprobs or top_logprobs), top_logprobs=int(top_logprobs or 0), stop=stop,
            loop=loop, out=asyncio.Queue(),
        )

    def _submit(req: GenRequest) -> None:
        try:
            engine.submit(req)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry later", code="queue_full",
                           headers={"Retry-After": str(cfg.retry_after_s)}) from None

    async def _collect(req: GenRequest, request: Request):
        """All events of a non-streaming request; cancels it if the client goes away."""
        events = []
        while True:
            try:
                ev = await asyncio.wait_for(req.out.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancelled.set()
                    return None
                continue
            events.append(ev)
            if isinstance(ev, DoneEvent):
                return events

    def _finish(done: DoneEvent) -> str:
        if done.finish_reason == "error":
            raise APIError(500, f"generation failed: {done.error}")
        return "length" if done.finish_reason == "length" else "stop"

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check(body)
        msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(p.get("text", "") for p in m.content)} for m in body.messages]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        req = _gen_request(body, ids, body.max_completion_tokens or body.max_tokens, body.logprobs, body.top_logprobs)
        _submit(req)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_chat_stream(req, rid, now, body), media_type="text/event-stream")
        events = await _collect(req, request)
        if events is None:
            return JSONResponse({}, status_code=499)
        done = events[-1]
        toks = [e for e in events if isinstance(e, TokenEvent)]
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(t.text for t in toks)},
                  "finish_reason": _finish(done), "logprobs": None}
        if req.logprobs:
            choice["logprobs"] = {"content": [_chat_lp(t) for t in toks]}
        return {"id": rid, "object": "chat.completion", "created": now, "model": cfg.model_name,
                "choices": [choice], "usage": _usage(done)}

    async def _chat_stream(req: GenRequest, rid: str, now: int, body: ChatRequest):
        def chunk(delta, finish=None, lp=None):
            c = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}
            return f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': now, 'model': cfg.model_name, 'choices': [c]})}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await req.out.get()
                if isinstance(ev, DoneEvent):
                    if ev.finish_reason == "error":
                        yield f"data: {json.dumps(error_body(f'generation failed: {ev.error}', 'server_error'))}\n\n"
                    else:
                        yield chunk({}, _finish(ev))
                    break
                lp = {"content": [_chat_lp(ev)]} if req.logprobs else None
                yield chunk({"content": ev.text}, lp=lp)
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop its generation
            req.cancelled.set()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check(body)
        ids = tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        req = _gen_request(body, ids, body.max_tokens or 16, body.logprobs is not None, body.logprobs)
        _submit(req)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_completion_stream(req, rid, now), media_type="text/event-stream")
        events = await _collect(req, request)
        if events is None:
            return JSONResponse({}, status_code=499)
        done = events[-1]
        toks = [e for e in events if isinstance(e, TokenEvent)]
        text = "".join(t.text for t in toks)
        choice = {"index": 0, "text": (body.prompt + text) if body.echo else text,
                  "finish_reason": _finish(done), "logprobs": None}
        if req.logprobs:
            offsets, pos = [], 0
            for t in toks:
                offsets.append(pos)
                pos += len(t.text)
            choice["logprobs"] = {"tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
                                  "top_logprobs": [dict(t.top_logprobs or []) for t in toks], "text_offset": offsets}
        return {"id": rid, "object": "text_completion", "created": now, "model": cfg.model_name,
                "choices": [choice], "usage": _usage(done)}

    async def _completion_stream(req: GenRequest, rid: str, now: int):
        def chunk(text, finish=None):
            c = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({'id': rid, 'object': 'text_completion', 'created': now, 'model': cfg.model_name, 'choices': [c]})}\n\n"

        try:
            while True:
                ev = await req.out.get()
                if isinstance(ev, DoneEvent):
                    yield chunk("", "length" if ev.finish_reason == "length" else "stop")
                    break
                yield chunk(ev.text)
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled.set()

    return app


def _chat_lp(t: TokenEvent) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
            "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in (t.top_logprobs or [])]}


def _usage(done: DoneEvent) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def build_server(cfg: ServeConfig, *, progress: bool = True):
    """Load models (building the toy world's if none are given), start the engine, return (app, engine)."""
    from ..experiment.generation import build_processor
    from ..proxy import load_causal_lm
    from ..settings import SamplingSettings
    from ..tokenizers import load_tokenizer

    teacher_path, proxy_path, grad_path = cfg.teacher, cfg.proxy, cfg.grad
    if teacher_path is None or (cfg.lam != 0 and (proxy_path is None or grad_path is None)):
        from ..config import load_config
        from ..experiment.sweep import Run, SweepConfig

        from pathlib import Path

        pkg = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
        run = Run(load_config(SweepConfig, pkg, [f"cache_dir={cfg.cache_dir}", f"runs_dir={cfg.runs_dir}",
                                                 "name=serve-world"]), progress=progress)
        teacher_path = teacher_path or run.paths["teacher"]
        proxy_path = proxy_path or run.paths["proxy"]
        grad_path = grad_path or str(run.gradient_path())
    tok = load_tokenizer(teacher_path)
    teacher = load_causal_lm(teacher_path)
    proc = None
    if cfg.lam != 0:
        s = SamplingSettings(method="antidistill", lam=cfg.lam, eps=cfg.eps, tau=cfg.tau, difference=cfg.difference)
        proc = build_processor(s, load_causal_lm(proxy_path), grad_path, tok, load_tokenizer(proxy_path))
    engine = BatchEngine(teacher, tok, proc, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                         batch_wait_s=cfg.batch_wait_ms / 1000)
    engine.start()
    return create_app(cfg, engine, tok), engine
