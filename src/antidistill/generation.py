"""Trace generation with any of the sampling methods, answer forcing and scoring.

Two ways to score a trace (``scoring``):

* ``"delivered"`` (teachers): the row's ``completion`` is exactly what a student trains on, and
  ``correct`` judges the answer written in that completion's own ``**Final Answer**`` block. A trace
  that wrote no header gets the answer-forcing text appended and its answer *sampled with the same
  sampler* (the same processor, τ and top-p); that continuation becomes part of the delivered trace.
* ``"forced"`` (students, as the paper evaluates them): the trace is cut at its own header, the
  header is forced, and the answer is continued greedily with no processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from accelerate.utils import gather_object

from .runtime import distributed_state
from .processor import (
    AntidistillationLogitsProcessor,
    PermutationLogitsProcessor,
    generate,
)
from .progress import track
from .prompting import ANSWER_FORCING, prompt_text
from .settings import SamplingSettings
from .scoring import (
    ANSWER_HEADER,
    close_answer,
    forced_answer,
    is_correct,
    written_answer,
)


def build_processor(settings: SamplingSettings, proxy, grad, teacher_tokenizer=None, proxy_tokenizer=None, *,
                    reasoning_only: bool = False, teacher_vocab_size: int | None = None, proxy_weights=None):
    """The logits processor for ``settings.method`` (None for greedy and temperature).

    ``reasoning_only``: λ switches off once the answer header (``**Final Answer**``, encoded by
    ``teacher_tokenizer``) has been generated. ``teacher_vocab_size``: the teacher's output width
    when it differs from the proxy's. An ensemble: ``proxy`` and ``grad`` are lists (one g per
    proxy), ``proxy_tokenizer`` one tokenizer or a list, ``proxy_weights`` the weights (default 1/K).
    """
    if not settings.uses_proxy:
        return None
    cls = AntidistillationLogitsProcessor if settings.method == "antidistill" else PermutationLogitsProcessor
    extra = {"seed": settings.seed} if settings.method == "permutation" else {}
    if proxy_weights is not None:
        extra["proxy_weights"] = proxy_weights
    if reasoning_only:
        if teacher_tokenizer is None:
            raise ValueError("reasoning_only needs the teacher tokenizer to encode the answer header")
        extra["stop_ids"] = teacher_tokenizer(ANSWER_HEADER, add_special_tokens=False)["input_ids"]
    return cls.from_settings(proxy, grad, settings, teacher_tokenizer=teacher_tokenizer, proxy_tokenizer=proxy_tokenizer,
                             teacher_vocab_size=teacher_vocab_size, **extra)


def answer_forcing_prefix(completion: str) -> str:
    """The trace up to the model's own ``**Final Answer**`` section, if it wrote one.

    Forcing appends a fresh final-answer header; a trace that already ends with one (as R1-style
    traces do) is cut there first, so the forced answer is the one that counts and the model never
    sees two headers in a row.
    """
    head = ANSWER_FORCING.strip().split("\n")[0]  # "**Final Answer**"
    i = completion.find(head)
    return completion if i < 0 else completion[:i].rstrip()


@runtime_checkable
class TextCompleter(Protocol):
    """A generation backend other than a transformers model, built for one :class:`SamplingSettings`
    (vLLM's: ``antidistill.engines.vllm.offline.VllmCompleter``). :func:`generate_traces` accepts one
    in place of the model; it then runs the same prompts, answer forcing and scoring."""

    def complete(self, prompts: list[str], max_new_tokens: int, *, sampled: bool, seeds: list[int]) -> list[str]:
        """Continuations of ``prompts``: with the settings' sampler (``sampled``, one seed per prompt) or
        greedily from the plain teacher (the paper's answer forcing)."""
        ...

    def close(self) -> None:
        """Release the backend (a sweep point closes its completer when its teacher stages are done)."""
        ...


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, gen_kwargs: dict, processor,
              seeds: list[int] | None = None) -> list[str]:
    if isinstance(model, TextCompleter):
        return model.complete(prompts, max_new_tokens, sampled=bool(gen_kwargs.get("do_sample")),
                              seeds=seeds or [0] * len(prompts))
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, **gen_kwargs)
    out = model.generate(**enc, **kwargs) if processor is None else generate(model, **enc, processor=processor, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_traces(
    model,
    tokenizer,
    problems: Sequence[dict],
    settings: SamplingSettings,
    *,
    processor=None,
    few_shot: list[dict] | None = None,
    progress: bool = True,
    description: str = "generate",
    scoring: str = "delivered",
) -> list[dict]:
    """Sample a trace for each problem, force an answer, and score it.

    Each problem is a mapping with ``id``, ``question`` and ``answer``. Returns one row per problem:
    ``id, question, answer, completion, forced_answer, correct, answer_source``: ``forced_answer`` is
    the answer that was judged, ``answer_source`` is ``"trace"`` (written by the trace itself) or
    ``"forced"`` (from answer forcing). See the module doc for ``scoring`` (``"delivered"`` or ``"forced"``).

    Batches are left-padded; batch ``i`` is sampled after ``torch.manual_seed(settings.seed + i)``,
    so a run is reproducible for a given batch size and process count.

    Under ``accelerate launch`` with N processes each process takes a contiguous shard of the
    problems and the rows are gathered back in order on every process (greedy output is identical
    to one process; sampled output is reproducible for a fixed N). Answer forcing appends
    ``\\n\\n**Final Answer**\\n\\boxed{`` and continues for ``settings.answer_tokens`` tokens.
    """
    if scoring not in ("delivered", "forced"):
        raise ValueError(f"scoring must be 'delivered' or 'forced', got scoring={scoring!r}")
    state = distributed_state()
    if state.num_processes > 1:
        with state.split_between_processes(list(problems)) as shard:
            local = _generate_rows(model, tokenizer, shard, settings, processor, few_shot,
                                   progress and state.is_main_process, description, scoring)
        return gather_object(local)
    return _generate_rows(model, tokenizer, problems, settings, processor, few_shot, progress, description, scoring)


def _generate_rows(model, tokenizer, problems, settings, processor, few_shot, progress, description,
                   scoring) -> list[dict]:
    tokenizer.padding_side = "left"
    if not isinstance(model, TextCompleter):
        model.eval()
    gen_kwargs = settings.sampling_kwargs()
    rows = []
    batches = [problems[i : i + settings.batch_size] for i in range(0, len(problems), settings.batch_size)]
    for b, batch in enumerate(track(batches, description, enabled=progress)):
        prompts = [prompt_text(tokenizer, p["question"], settings.system_prompt, few_shot) for p in batch]
        torch.manual_seed(settings.seed + b)
        seeds = [settings.seed + b * settings.batch_size + i for i in range(len(batch))]  # backends seeding per row
        completions = _generate(model, tokenizer, prompts, settings.max_new_tokens, gen_kwargs, processor, seeds)
        if scoring == "forced":
            rows += _forced_rows(model, tokenizer, batch, prompts, completions, settings)
        else:
            rows += _delivered_rows(model, tokenizer, batch, prompts, completions, settings, gen_kwargs, processor,
                                    seeds)
    return rows


def _row(p: dict, completion: str, answer: str, source: str) -> dict:
    return {"id": p["id"], "question": p["question"], "answer": str(p["answer"]), "completion": completion,
            "forced_answer": answer, "correct": is_correct(answer, str(p["answer"])), "answer_source": source}


def _forced_rows(model, tokenizer, batch, prompts, completions, settings) -> list[dict]:
    """The paper's evaluation: cut at the model's own header, force one, continue greedily."""
    forced_prompts = [p + answer_forcing_prefix(c) + ANSWER_FORCING for p, c in zip(prompts, completions)]
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    forced = _generate(model, tokenizer, forced_prompts, settings.answer_tokens, greedy, None)
    return [_row(p, c, forced_answer(f), "forced") for p, c, f in zip(batch, completions, forced)]


def _delivered_rows(model, tokenizer, batch, prompts, completions, settings, gen_kwargs, processor,
                    seeds) -> list[dict]:
    """Score each trace on its own final block; traces without one get a *sampled* forced answer."""
    written = [written_answer(c) for c in completions]
    missing = [i for i, w in enumerate(written) if w is None]
    forced = {}
    if missing:
        if processor is not None and hasattr(processor, "reset"):
            processor.reset()
        texts = _generate(model, tokenizer, [prompts[i] + completions[i] + ANSWER_FORCING for i in missing],
                          settings.answer_tokens, gen_kwargs, processor, [seeds[i] for i in missing])
        forced = dict(zip(missing, texts))
    rows = []
    for i, (p, c) in enumerate(zip(batch, completions)):
        if i in forced:
            cont = close_answer(forced[i])
            rows.append(_row(p, c + ANSWER_FORCING + cont, forced_answer(cont), "forced"))
        else:
            rows.append(_row(p, c, written[i], "trace"))
    return rows
