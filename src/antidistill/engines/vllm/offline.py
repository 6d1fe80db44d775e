"""Offline trace generation on vLLM for the experiment: a backend for its own trace generation.

:class:`VllmCompleter` implements :class:`antidistill.generation.TextCompleter`, so
:func:`generate_traces` here is the transformers path's ``generate_traces`` with vLLM doing the
decoding: the same prompts (:func:`~antidistill.prompting.prompt_text`, tokenized without special
tokens), the same answer forcing and the same scoring (``delivered`` for teachers, ``forced`` for
the paper's student evaluation).

Differences from the transformers path, by design:

- Each batch goes to vLLM at once and vLLM batches it continuously.
- Sampling randomness: each request gets its own seed (``settings.seed`` + its index), where the
  transformers path seeds the global RNG once per batch. Sampled traces are therefore reproducible
  but not the same tokens as the transformers path; greedy rows (``method="greedy"``, and every
  greedy forced answer) are the same up to fp32 argmax ties.
- λ, ε, τ and the difference are fixed per engine: a sweep builds one engine per point.
- Multi-process sharding (``accelerate launch``) does not apply; vLLM parallelises itself.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from ...generation import generate_traces as experiment_traces
from .policy import MODE_KEY
from .setup import VllmSettings, build_llm


def build_offline_llm(teacher, proxy, grad, settings, *, workdir, **kwargs):
    """A ``vllm.LLM`` for :func:`generate_traces` from :class:`~antidistill.SamplingSettings`.

    The composite carries the proxy only for ``antidistill`` and ``permutation``; λ, ε, τ and the
    difference are fixed here for the engine's lifetime (one engine per sweep cell, or per λ).
    """
    uses_proxy = settings.method in ("antidistill", "permutation") and settings.lam != 0.0
    vs = VllmSettings(lam=settings.lam if uses_proxy else 0.0, eps=settings.eps, tau=settings.tau,
                      difference=settings.difference, output="teacher")
    return build_llm(teacher, proxy if uses_proxy else None, grad if uses_proxy else None, settings=vs,
                     workdir=workdir, **kwargs)


class VllmCompleter:
    """The experiment's :class:`~antidistill.generation.TextCompleter` on a ``vllm.LLM`` from
    :func:`build_offline_llm`: one engine, one :class:`~antidistill.SamplingSettings` (its method picks
    eq. 11, the permutation baseline or the plain teacher for every sampled request)."""

    def __init__(self, llm, tokenizer, settings):
        self.llm, self.tokenizer, self.settings = llm, tokenizer, settings
        mode = {"greedy": "teacher", "temperature": "teacher", "antidistill": "antidistill",
                "permutation": "permutation"}[settings.method]
        self.mode = "teacher" if mode != "teacher" and settings.lam == 0.0 else mode  # λ = 0 is eq. 1

    def complete(self, prompts: list[str], max_new_tokens: int, *, sampled: bool, seeds: list[int]) -> list[str]:
        from vllm import SamplingParams, TokensPrompt

        s, eos = self.settings, self.tokenizer.eos_token_id
        common = dict(max_tokens=max_new_tokens, stop_token_ids=[eos] if eos is not None else None,
                      skip_special_tokens=True)
        if sampled and s.method != "greedy":
            params = [SamplingParams(temperature=s.tau, top_p=s.top_p, top_k=s.top_k or -1, seed=seed,
                                     extra_args={MODE_KEY: self.mode, "permutation_seed": seed}, **common)
                      for seed in seeds]
        else:  # greedy decoding of the plain teacher: the greedy method, and the paper's answer forcing
            params = [SamplingParams(temperature=0.0, extra_args={MODE_KEY: "teacher"}, **common)] * len(prompts)
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        # decode ourselves, as the transformers path does, so the text is byte-identical for the same ids
        return [self.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True) for o in outs]


    def close(self) -> None:
        """Shut the engine down now: the next point's engine needs vLLM's process-wide state, which a
        previous engine tears down whenever the garbage collector happens to reach it."""
        self.llm = None
        gc.collect()


def generate_traces(llm, tokenizer, problems: Sequence[dict], settings, *, few_shot: list[dict] | None = None,
                    scoring: str = "delivered") -> list[dict]:
    """:func:`antidistill.generation.generate_traces` on vLLM: the same prompts, answer
    forcing and scoring, with each request seeded by ``settings.seed`` + its index."""
    return experiment_traces(VllmCompleter(llm, tokenizer, settings), tokenizer, problems, settings,
                             few_shot=few_shot, progress=False, scoring=scoring)


def sweep_completer(teacher: str, proxy: str, grad: str, tokenizer, settings, workdir) -> VllmCompleter:
    """The sweep's completer factory (``SweepConfig.engine: vllm``): one engine per sweep point."""
    return VllmCompleter(build_offline_llm(teacher, proxy, grad, settings, workdir=workdir), tokenizer, settings)
