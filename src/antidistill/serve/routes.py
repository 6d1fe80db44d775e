"""The HTTP routes: ``/health`` (open), ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Each generation request is validated in full, then tokenized on a small thread pool (never on the
event loop), then queued. Its handler waits for the engine's events and for the client's
disconnect (set by :class:`~.middleware.RequestGuard`): a client that leaves, streaming or not,
is cancelled at once (a queued request leaves the queue, a running one frees its slots at the
next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from . import schemas as S
from ..serving_policy import PolicyError, ServingPolicy, Work
from .config import ServeConfig
from .engine import DoneEvent, Engine, EngineDead, GenRequest, QueueFull, TokenEvent
from .errors import APIError, engine_error, error_event, error_response, validation_error
from .middleware import DISCONNECTED
from .detok import TextStream
from .prompt import PromptEncoder



class _BadBody(Exception):
    pass


def _no_constants(name: str):
    raise _BadBody(f"{name} is not valid JSON")


def _check_strings(obj, depth: int = 0) -> None:
    """400 for lone surrogates anywhere in the body (they cannot be encoded as UTF-8)."""
    if depth > 32:
        raise _BadBody("the body is nested too deeply")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadBody("the body holds a lone surrogate (\\ud800-\\udfff escape); text must be valid Unicode") from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_strings(v, depth + 1)


async def parse_body(request: Request, model: type[BaseModel], policy: ServingPolicy, endpoint: str):
    """The body as ``model`` and the :class:`~antidistill.serving_policy.Work` the policy allows, or a 400."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the body is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
        _check_strings(data)
    except _BadBody as e:
        raise APIError(400, str(e)) from None
    except (ValueError, RecursionError):
        raise APIError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        work = policy.check(data, endpoint)
    except PolicyError as e:
        raise APIError(400, e.message, param=e.param, code=e.code) from None
    try:
        return model.model_validate(data), work
    except ValidationError as e:
        raise validation_error(e.errors()) from None


@dataclass
class Out:
    """A piece of a request's text; ``ev`` is the token that made it final (None for held-back text at the end)."""

    text: str
    ev: TokenEvent | None


@dataclass
class Context:
    cfg: ServeConfig
    engine: Engine
    encoder: PromptEncoder
    pool: ThreadPoolExecutor
    max_positions: int | None
    created: int


def build_routers(ctx: Context, require_key) -> list[APIRouter]:
    cfg, engine = ctx.cfg, ctx.engine
    policy = cfg.policy()
    open_router = APIRouter()
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @open_router.get("/health", response_model=S.Health)
    async def health():
        if not engine.alive:
            return error_response(503, "the generation engine is not running", code="engine_dead")
        return S.Health(queued=engine.queued, running=engine.running, antidistillation=engine.defended)

    @v1.get("/models", response_model=S.ModelList)
    async def models():
        return S.ModelList(data=[S.Model(id=cfg.model_name, created=ctx.created)])

    def check(body: S._Common, work: Work) -> None:
        if body.model != cfg.model_name:
            raise APIError(400, f"model {body.model!r} does not exist; this server has {cfg.model_name!r}",
                           param="model", code="model_not_found")
        if work.n != 1 or work.prompts != 1:
            raise APIError(400, "the embedded engine serves one choice for one prompt per request (n=1)", param="n")

    async def gen_request(body, encode, arg, work: Work, logprobs: bool, top_logprobs: int) -> GenRequest:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(ctx.pool, encode, arg)  # off the event loop
        limit = work.max_tokens
        if ctx.max_positions is not None:
            limit = min(limit, ctx.max_positions - len(ids))
            if limit < 1:
                raise APIError(400, f"prompt has {len(ids)} tokens, which leaves no room in the model's "
                                    f"{ctx.max_positions} positions", code="context_length_exceeded")
        return GenRequest(prompt_ids=ids, max_tokens=limit, temperature=float(body.temperature or 0.0),
                          top_p=max(float(body.top_p or 1.0), cfg.min_top_p), seed=body.seed, logprobs=logprobs,
                          top_logprobs=top_logprobs, stop=work.stop, loop=loop, out=asyncio.Queue())

    def submit(req: GenRequest) -> None:
        try:
            engine.submit(req)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry later", code="queue_full",
                           headers={"Retry-After": str(cfg.retry_after_s)}) from None
        except EngineDead:
            raise APIError(503, "the generation engine is not running", code="engine_dead") from None

    async def next_event(req: GenRequest, request: Request):
        """The request's next engine event, or None once its client has gone away."""
        gone = request.scope.get(DISCONNECTED)
        if gone is None:
            return await req.out.get()
        get, waiter = asyncio.ensure_future(req.out.get()), asyncio.ensure_future(gone.wait())
        await asyncio.wait({get, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if get.done():
            return get.result()
        get.cancel()
        return None

    async def outputs(req: GenRequest, request: Request):
        """The request's text pieces (:class:`Out`) and then its :class:`DoneEvent`; None once its client left.

        Text is decoded here, incrementally (``detok.TextStream``), not on the model thread. A stop string
        ends the request with ``finish_reason="stop"``: the text before it is returned, the stop string and
        what follows are not (OpenAI's and vLLM's semantics), and the engine is told to stop at once."""
        ts, n, finished = TextStream(engine.tok, req.stop), 0, False
        try:
            while True:
                ev = await next_event(req, request)
                if ev is None:
                    yield None
                    return
                if isinstance(ev, DoneEvent):
                    finished = True
                    if ev.finish_reason != "error":
                        tail = ts.flush()
                        if tail:
                            yield Out(tail, None)
                    yield ev
                    return
                n += 1
                yield Out(ts.push(ev.token_id), ev)
                if ts.stopped:
                    finished = True
                    engine.cancel(req)
                    yield DoneEvent("stop", len(req.prompt_ids), n)
                    return
        finally:
            if not finished:  # the client went away (or the server is shutting down): stop its generation
                engine.cancel(req)

    async def collect(req: GenRequest, request: Request) -> tuple[str, list[TokenEvent], DoneEvent] | None:
        """A non-streaming request's text, token events and end, or None if the client went away first."""
        texts, toks, gen = [], [], outputs(req, request)
        try:
            async for out in gen:
                if out is None:
                    return None
                if isinstance(out, DoneEvent):
                    return "".join(texts), toks, out
                texts.append(out.text)
                if out.ev is not None:
                    toks.append(out.ev)
            return None
        finally:
            await gen.aclose()

    def finish_reason(done: DoneEvent) -> str:
        if done.finish_reason == "error":
            raise engine_error(done.error)
        return "length" if done.finish_reason == "length" else "stop"

    def usage(done: DoneEvent) -> S.Usage:
        return S.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                       total_tokens=done.prompt_tokens + done.completion_tokens)

    def token_text(token_id: int) -> str:
        return engine.tok.decode([token_id])

    def top_list(t: TokenEvent) -> list[tuple[str, float]]:
        return [(token_text(j), v) for j, v in (t.top_logprobs or [])]

    def chat_lp(t: TokenEvent) -> S.TokenLogprob:
        text = token_text(t.token_id)
        return S.TokenLogprob(token=text, logprob=t.logprob, bytes=list(text.encode()), top_logprobs=[
            S.TopLogprob(token=s, logprob=v, bytes=list(s.encode())) for s, v in top_list(t)])

    async def stream(req: GenRequest, request: Request, on_token, on_done, first: str | None = None):
        """Server-sent events: ``first``, a line per text piece, ``on_done``'s line and ``[DONE]``. An engine
        error is an ``error`` event (never a ``finish_reason``); a client that goes away is cancelled."""
        gen, finished = outputs(req, request), False
        try:
            if first is not None:
                yield first
            async for out in gen:
                if out is None:
                    return
                if isinstance(out, DoneEvent):
                    finished = True
                    yield error_event(out.error) if out.finish_reason == "error" else on_done(out)
                    yield "data: [DONE]\n\n"
                    return
                if out.text or out.ev is not None:
                    yield on_token(out)
        finally:
            if not finished:  # the client went away (or the server is shutting down): stop its generation
                engine.cancel(req)
            await gen.aclose()

    @v1.post("/chat/completions", response_model=S.ChatCompletion)
    async def chat(request: Request):
        body, work = await parse_body(request, S.ChatRequest, policy, "chat")
        check(body, work)
        req = await gen_request(body, ctx.encoder.chat_ids, work.messages, work,
                                bool(body.logprobs or body.top_logprobs), int(body.top_logprobs or 0))
        submit(req)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish=None, lp=None) -> str:
            c = S.ChatCompletionChunk(id=rid, created=now, model=cfg.model_name,
                                      choices=[S.ChunkChoice(delta=delta, finish_reason=finish, logprobs=lp)])
            return f"data: {c.model_dump_json()}\n\n"

        if body.stream:
            def token_line(out: Out) -> str:
                lp = S.ChoiceLogprobs(content=[chat_lp(out.ev)]) if req.logprobs and out.ev is not None else None
                return chunk(S.ChunkDelta(content=out.text), lp=lp)

            return StreamingResponse(
                stream(req, request, token_line, lambda done: chunk(S.ChunkDelta(), finish_reason(done)),
                       first=chunk(S.ChunkDelta(role="assistant", content=""))),
                media_type="text/event-stream")
        got = await collect(req, request)
        if got is None:
            return error_response(400, "the client disconnected", code="client_disconnected")
        text, toks, done = got
        choice = S.ChatChoice(message=S.AssistantMessage(content=text), finish_reason=finish_reason(done),
                              logprobs=S.ChoiceLogprobs(content=[chat_lp(t) for t in toks]) if req.logprobs else None)
        return S.ChatCompletion(id=rid, created=now, model=cfg.model_name, choices=[choice], usage=usage(done))

    @v1.post("/completions", response_model=S.Completion)
    async def completions(request: Request):
        body, work = await parse_body(request, S.CompletionRequest, policy, "completions")
        check(body, work)
        req = await gen_request(body, ctx.encoder.completion_ids, body.prompt, work,
                                body.logprobs is not None, int(body.logprobs or 0))
        submit(req)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish=None) -> str:
            c = S.Completion(id=rid, created=now, model=cfg.model_name,
                             choices=[S.CompletionChoice(text=text, finish_reason=finish)])
            return f"data: {c.model_dump_json(exclude={'usage'})}\n\n"

        if body.stream:
            return StreamingResponse(stream(req, request, lambda out: chunk(out.text),
                                            lambda done: chunk("", finish_reason(done))),
                                     media_type="text/event-stream")
        got = await collect(req, request)
        if got is None:
            return error_response(400, "the client disconnected", code="client_disconnected")
        text, toks, done = got
        lp = None
        if req.logprobs:
            offsets, pos, strs = [], len(body.prompt) if body.echo else 0, [token_text(t.token_id) for t in toks]
            for t in strs:
                offsets.append(pos)
                pos += len(t)
            lp = S.CompletionLogprobs(tokens=strs, token_logprobs=[t.logprob for t in toks],
                                      top_logprobs=[dict(top_list(t)) for t in toks], text_offset=offsets)
        choice = S.CompletionChoice(text=(body.prompt + text) if body.echo else text, finish_reason=finish_reason(done),
                                    logprobs=lp)
        return S.Completion(id=rid, created=now, model=cfg.model_name, choices=[choice], usage=usage(done))

    return [open_router, v1]
