"""An OpenAI-compatible server whose completions are antidistillation-sampled.

Security model (``docs/serving.md`` has the long form). The only distribution a request can
observe is the operator's eq. 11 distribution q = softmax(log p_T/τ + λΔ̂), with λ, ε, τ, the
difference mode, the proxy and g all the operator's, or a flattening of it:

* a request temperature T > τ samples q^(τ/T) (temperature applied to the whole eq. 11 logit);
  any T ≤ τ, including 0 and an omitted temperature, samples q itself. ``seed`` makes it
  reproducible. Two temperatures therefore never separate log p_T from λΔ̂;
* ``logprobs``/``top_logprobs`` are those of the distribution actually sampled (q, flattened, after
  top-p); −inf is written as −9999.0, as OpenAI does;
* a row whose eq. 11 scores are not finite ends its request with an error, never a teacher fallback;
* a request naming λ, ε, τ, the proxy, g or ``logit_bias`` gets a 400.

Layout: :mod:`.config` (operator settings), :mod:`.auth` (key dependency), :mod:`.middleware` (body
cap, disconnects), :mod:`.prompt` (safe tokenization), :mod:`.schemas` (typed bodies),
:mod:`.routes`, :mod:`.engine` (continuous batching), :mod:`.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import Depends, FastAPI

from ..proxy import load_causal_lm
from ..slots import SlotDelta
from ..tokenizer_compat import check_compatible_tokenizers, check_vocab_sizes, load_tokenizer
from .auth import key_dependency
from .config import ServeConfig
from .engine import Engine
from .errors import install as install_errors
from .connections import uvicorn_kwargs
from .middleware import RequestGuard, RequestLimit
from .prompt import PromptEncoder
from .routes import Context, build_routers

log = logging.getLogger("antidistill.serve")


def _max_positions(*models) -> int | None:
    limits = [getattr(m.config, a) for m in models for a in ("max_position_embeddings", "n_positions")
              if isinstance(getattr(m.config, a, None), int)]
    return min(limits) if limits else None


def create_app(cfg: ServeConfig, engine: Engine, tokenizer, *, max_positions: int | None = None) -> FastAPI:
    """The ASGI app around a started :class:`Engine`; stopping the app stops the engine."""
    pool = ThreadPoolExecutor(cfg.tokenizer_threads, thread_name_prefix="antidistill-tok")
    max_prompt = cfg.max_prompt_tokens if max_positions is None else min(cfg.max_prompt_tokens, max_positions - 1)
    ctx = Context(cfg, engine, PromptEncoder(tokenizer, max_prompt), pool, max_positions, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    # redirect_slashes off: Starlette's 307 for "/v1/models/" would point at whatever Host the client sent
    app = FastAPI(title="antidistill", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan, redirect_slashes=False)
    install_errors(app)
    require_key = key_dependency(cfg)
    for router in build_routers(ctx, require_key):
        app.include_router(router)
    if cfg.docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
        async def openapi():
            return app.openapi()
    policy = cfg.policy()
    app.add_middleware(RequestGuard, max_body_bytes=policy.max_body_bytes, body_timeout_s=policy.body_timeout_s)
    app.add_middleware(RequestLimit, max_requests=policy.max_requests, retry_after_s=policy.retry_after_s)
    app.state.engine, app.state.encoder = engine, ctx.encoder
    return app


def build_server(cfg: ServeConfig):
    """Load the models ``cfg`` names, start the engine, return (app, engine).

    ``antidistill serve`` fills in the toy world's models for the paths a config leaves out.
    """
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    s = cfg.sampling
    paths = {"teacher": cfg.teacher, "proxy": cfg.proxy, "grad": cfg.grad}
    if cfg.teacher is None or (s.lam != 0 and (cfg.proxy is None or cfg.grad is None)):
        missing = [k for k, v in paths.items() if v is None and (k == "teacher" or s.lam != 0)]
        raise ValueError(f"the server needs {' and '.join(missing)} (lam={s.lam:g}); "
                         "`antidistill serve` builds the toy world's when none are given")
    tok = load_tokenizer(paths["teacher"])
    teacher = load_causal_lm(paths["teacher"])
    models = [teacher]
    delta = None
    if s.lam != 0:
        proxy = load_causal_lm(paths["proxy"])
        check_compatible_tokenizers(tok, load_tokenizer(paths["proxy"]))
        check_vocab_sizes(teacher, proxy)
        models.append(proxy)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        delta = SlotDelta(proxy, paths["grad"], eps=s.eps, difference=s.difference, pad_token_id=pad)
    engine = Engine(teacher, tok, delta, lam=s.lam, tau=s.tau, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(cfg, engine, tok, max_positions=_max_positions(*models))
    engine.start()
    return app, engine


def serve_forever(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; then drain for ``cfg.drain_s`` seconds, cancel what is left and exit."""
    app, engine = build_server(cfg)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=cfg.drain_s,
                    **uvicorn_kwargs(cfg.policy()))
    finally:
        engine.stop()
