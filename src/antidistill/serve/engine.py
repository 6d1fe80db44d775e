"""A continuous-batching decode engine: requests join and leave the running batch between steps.

One worker thread owns the models. Each step it admits waiting requests (up to ``max_batch``
running), feeds every running request its next token (a new one its prompt) through the teacher
and the two perturbed proxies, each holding one KV slot per request (:mod:`antidistill.slots`),
and samples each row from :func:`antidistill.sampling.sampling_logprobs` (eq. 11 with the
operator's λ and τ, the request's flattening min(1, τ/T) and top-p). A request that ends leaves at
once; a short request never waits for a long one.

Isolation: a request that fails, fails alone. A bad seed fails at admission; a row whose eq. 11
scores are not finite ends its own request with an error (never a teacher fallback); a forward
that raises is rolled back and retried row by row, so only the rows that fail alone are ended.
An exception outside those guards kills the worker: every waiting and running request then gets
an error, ``alive`` turns False (``/health`` answers 503) and ``submit`` refuses new work.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field

import torch

from ..sampling import row_generator, sample_rows, sampling_logprobs
from ..slots import SlotKV, forward_all

log = logging.getLogger("antidistill.serve")
_ids = itertools.count()


class QueueFull(Exception):
    """The bounded request queue is full: answer 429."""


class EngineDead(Exception):
    """The worker thread is not running: answer 503."""


@dataclass
class TokenEvent:
    """One sampled token. The engine never decodes text: the handler does (``serve.detok.TextStream``)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # a public error code, never an exception's text


@dataclass(eq=False)
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    logprobs: bool
    top_logprobs: int
    stop: list[str]  # applied by the handler (serve.detok.TextStream), not by the engine
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    rid: int = field(default_factory=lambda: next(_ids))

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass(eq=False)
class _Live:
    req: GenRequest
    gen: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    feed: list[int] | None = None  # tokens to run next step


class Engine:
    """Owns the teacher's and proxies' slots; serves :class:`GenRequest`.

    Args:
        teacher: causal LM. tokenizer: its tokenizer.
        delta: a :class:`~antidistill.slots.SlotDelta`, or None for λ = 0 (plain temperature sampling).
        lam, tau: the operator's λ and τ.
    """

    def __init__(self, teacher, tokenizer, delta=None, *, lam: float = 0.0, tau: float = 1.0, max_batch: int = 32,
                 max_queue: int = 64):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tok, self.delta = tokenizer, delta
        self.lam, self.tau = float(lam if delta is not None else 0.0), float(tau)
        self.kvs = [SlotKV(teacher, pad_token_id=pad)] + (list(delta.kvs) if delta is not None else [])
        self.device = self.kvs[0].device
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._running: dict[int, _Live] = {}
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._worker, name="antidistill-engine", daemon=True)
        self.stats = {"steps": 0, "rows": 0, "tokens": 0, "cancelled": 0, "errors": 0, "max_running": 0}
        # Called by the worker before each decode step that has running requests, after admission and
        # before cancelled requests are swept. It may block: tests use it to hold the engine at a known
        # token count instead of assuming how fast a token is.
        self.before_step = None

    # --- the API the server uses ---------------------------------------------------------------
    @property
    def defended(self) -> bool:
        return self.delta is not None

    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if not self.alive:
                raise EngineDead
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: GenRequest) -> None:
        """The client went away: a waiting request leaves the queue now, a running one at the next step."""
        req.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(req)
            except ValueError:
                return
        self.stats["cancelled"] += 1
        req.emit(DoneEvent("cancelled", len(req.prompt_ids), 0))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker and end every outstanding request with an error."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)
        self._fail_all("server_shutting_down")

    # --- the worker ----------------------------------------------------------------------------
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                self._iteration()
        except BaseException as e:  # a bug, or the process is failing: do not leave anyone waiting
            self._dead = e
            log.exception("engine worker died")
            self._fail_all("engine_dead")

    def _fail_all(self, code: str) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            running, self._running = list(self._running.values()), {}
        for r in waiting:
            r.emit(DoneEvent("error", len(r.prompt_ids), 0, error=code))
        for lv in running:
            lv.req.emit(DoneEvent("error", len(lv.req.prompt_ids), len(lv.out_ids), error=code))

    def _iteration(self) -> None:
        self._admit()
        if self._running and self.before_step is not None:
            self.before_step(self)
        for lv in [lv for lv in self._running.values() if lv.req.cancelled.is_set()]:
            self.stats["cancelled"] += 1
            self._finish(lv, "cancelled")
        if not self._running:
            return
        lives = list(self._running.values())
        results = self._forward(lives)
        lives = [lv for lv in lives if lv.req.rid in results]
        if not lives:
            return
        self.stats["steps"] += 1
        teacher = torch.stack([results[lv.req.rid][0] for lv in lives])
        delta = torch.stack([results[lv.req.rid][1] for lv in lives]) if self.defended else None
        temps = torch.tensor([lv.req.temperature for lv in lives], dtype=torch.float32, device=teacher.device)
        top_ps = torch.tensor([lv.req.top_p for lv in lives], dtype=torch.float32, device=teacher.device)
        logprobs, ok = sampling_logprobs(teacher, delta, self.lam, self.tau, temps, top_ps)
        good = [i for i in range(len(lives)) if bool(ok[i])]
        for i in range(len(lives)):
            if not bool(ok[i]):
                self._error(lives[i], "nonfinite_scores")
        if not good:
            return
        tokens = sample_rows(logprobs[good], [lives[i].gen for i in good]).tolist()
        for i, t in zip(good, tokens):
            try:
                self._emit_token(lives[i], int(t), logprobs[i])
            except Exception:
                log.exception("request %d failed while emitting a token", lives[i].req.rid)
                self._error(lives[i], "generation_failed")

    def _admit(self) -> None:
        with self._cv:
            if not self._running and not self._waiting:
                self._cv.wait(timeout=0.1)
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())
        for r in admitted:
            if r.cancelled.is_set():
                self.stats["cancelled"] += 1
                r.emit(DoneEvent("cancelled", len(r.prompt_ids), 0))
                continue
            try:
                gen = row_generator(r.seed, self.device)
            except Exception:
                self.stats["errors"] += 1
                r.emit(DoneEvent("error", len(r.prompt_ids), 0, error="invalid_seed"))
                continue
            self._running[r.rid] = _Live(r, gen, feed=list(r.prompt_ids))
            self.stats["rows"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))

    def _forward(self, lives: list[_Live]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Teacher logits and Δ̂ for each live request; a request whose forward fails alone is ended."""
        try:
            return self._forward_rows(lives)
        except Exception:
            if len(lives) == 1:
                log.exception("request %d failed in the forward pass", lives[0].req.rid)
                self._error(lives[0], "generation_failed")
                return {}
        out = {}  # the batch failed: find the culprit(s) row by row; the rest go on
        for lv in lives:
            try:
                out.update(self._forward_rows([lv]))
            except Exception:
                log.exception("request %d failed in the forward pass", lv.req.rid)
                self._error(lv, "generation_failed")
        return out

    def _forward_rows(self, lives: list[_Live]) -> dict:
        feeds = [(lv.req.rid, lv.feed) for lv in lives]
        outs = forward_all(self.kvs, feeds)  # transactional: on failure no slot moved
        delta = self.delta.from_logits(outs[1], outs[2]) if self.defended else None
        return {lv.req.rid: (outs[0][i], None if delta is None else delta[i]) for i, lv in enumerate(lives)}

    def _emit_token(self, lv: _Live, t: int, logprobs: torch.Tensor) -> None:
        """Hand the token to the request's handler. No decoding here: text and stop strings are the
        handler's (incremental, off this thread); a handler that meets a stop string cancels the request."""
        r = lv.req
        lv.out_ids.append(t)
        self.stats["tokens"] += 1
        if t == self.tok.eos_token_id:
            return self._finish(lv, "stop")
        ev = TokenEvent(t)
        if r.logprobs:
            ev.logprob = float(logprobs[t])
            if r.top_logprobs:
                vals, idx = torch.topk(logprobs, r.top_logprobs)
                ev.top_logprobs = list(zip(idx.tolist(), vals.tolist()))
        r.emit(ev)
        if len(lv.out_ids) >= r.max_tokens:
            return self._finish(lv, "length")
        lv.feed = [t]

    def _free(self, rid: int) -> None:
        self._running.pop(rid, None)
        for kv in self.kvs:
            kv.free(rid)

    def _finish(self, lv: _Live, reason: str) -> None:
        self._free(lv.req.rid)
        lv.req.emit(DoneEvent(reason, len(lv.req.prompt_ids), len(lv.out_ids)))

    def _error(self, lv: _Live, code: str) -> None:
        self.stats["errors"] += 1
        self._free(lv.req.rid)
        lv.req.emit(DoneEvent("error", len(lv.req.prompt_ids), len(lv.out_ids), error=code))
