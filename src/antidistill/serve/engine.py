"""A batching decode engine: concurrent requests share teacher and proxy forward passes.

One worker thread owns the models. It takes up to ``max_batch`` waiting requests, left-pads them
into one batch, and decodes them together with the teacher's KV cache. Every step it samples from
eq. 11 through :meth:`AntidistillationLogitsProcessor.adjusted_logits`, whose proxy keeps its own KV
caches. Requests that arrive mid-round wait for the next round: this is static batching per round.
Tokens go back to each request's asyncio queue as they are made.
A cancelled request (a client that went away) is finished at the next step, and the round stops
when every row is finished.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..proxy import cache_kwarg, left_padding_mask


class QueueFull(Exception):
    """The bounded request queue is full: answer 429."""


@dataclass
class TokenEvent:
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    greedy: bool
    tau: float
    top_p: float
    seed: int | None
    logprobs: bool
    top_logprobs: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` logits with tokens outside each row's nucleus set to −inf (``top_p``: ``(B,)``)."""
    if bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    remove = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p[:, None]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter(-1, idx, remove)
    return logits.masked_fill(mask, float("-inf"))


class BatchEngine:
    """Owns teacher, tokenizer and (optionally) the antidistillation processor; serves GenRequests."""

    def __init__(self, teacher, tokenizer, processor=None, *, max_batch: int = 32, max_queue: int = 64,
                 batch_wait_s: float = 0.01):
        self.teacher = teacher.eval()
        self.tok = tokenizer
        self.processor = processor
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self._cache_kw = cache_kwarg(teacher)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="antidistill-engine", daemon=True)
        self.stats = {"rounds": 0, "rows": 0, "tokens": 0, "cancelled": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, req: GenRequest) -> None:
        try:
            self._queue.put_nowait(req)
        except queue.Full as e:
            raise QueueFull from e

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # --- worker ------------------------------------------------------------------------
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled.is_set()] or []
            if not batch:
                continue
            try:
                self._round(batch)
            except Exception as e:  # a failed round must not take the server down or leave a request hanging
                for r in batch:
                    r.emit(DoneEvent("error", len(r.prompt_ids), 0, error=f"{type(e).__name__}: {e}"))

    def _round(self, batch: list[GenRequest]) -> None:
        tok, teacher = self.tok, self.teacher
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        device = next(teacher.parameters()).device
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        from transformers import DynamicCache

        cache = DynamicCache(config=teacher.config)
        taus = torch.tensor([r.tau for r in batch], dtype=torch.float32, device=device)
        top_ps = torch.tensor([r.top_p for r in batch], dtype=torch.float32, device=device)
        gens = [torch.Generator(device=device).manual_seed(r.seed) if r.seed is not None else None for r in batch]
        done = [False] * len(batch)
        n_out = [0] * len(batch)
        texts = [""] * len(batch)
        new = ids
        if self.processor is not None:
            self.processor.reset()
        self.stats["rounds"] += 1
        self.stats["rows"] += len(batch)
        for _step in range(max(r.max_tokens for r in batch)):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1]:]
            logits = teacher(input_ids=new, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache}).logits[:, -1].float()
            if self.processor is not None:
                adjusted = self.processor.adjusted_logits(ids, logits, tau=taus)  # eq. 11
            else:
                adjusted = torch.log_softmax(logits, -1) / taus[:, None]  # eq. 1
            adjusted = top_p_filter(adjusted, top_ps)
            logp = torch.log_softmax(adjusted, dim=-1)  # the distribution actually sampled
            next_ids = torch.full((len(batch),), pad, dtype=torch.long, device=device)
            for i, r in enumerate(batch):
                if done[i]:
                    continue
                if r.cancelled.is_set():
                    done[i] = True
                    self.stats["cancelled"] += 1
                    r.emit(DoneEvent("cancelled", len(r.prompt_ids), n_out[i]))
                    continue
                if r.greedy:
                    t = int(torch.argmax(logp[i]))
                else:
                    t = int(torch.multinomial(logp[i].exp(), 1, generator=gens[i]))
                next_ids[i] = t
                n_out[i] += 1
                self.stats["tokens"] += 1
                if t == tok.eos_token_id:
                    done[i] = True
                    r.emit(DoneEvent("stop", len(r.prompt_ids), n_out[i]))
                    continue
                piece = tok.decode([t], skip_special_tokens=True)
                texts[i] += piece
                ev = TokenEvent(t, piece)
                if r.logprobs:
                    ev.logprob = float(logp[i, t])
                    if r.top_logprobs:
                        vals, idx = torch.topk(logp[i], r.top_logprobs)
                        ev.top_logprobs = [(tok.decode([int(j)]), float(v)) for v, j in zip(vals, idx)]
                r.emit(ev)
                if any(s in texts[i] for s in r.stop):
                    done[i] = True
                    r.emit(DoneEvent("stop", len(r.prompt_ids), n_out[i]))
                elif n_out[i] >= r.max_tokens:
                    done[i] = True
                    r.emit(DoneEvent("length", len(r.prompt_ids), n_out[i]))
            if all(done):
                return
            new = next_ids[:, None]
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
