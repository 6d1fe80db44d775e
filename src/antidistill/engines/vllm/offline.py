"""Offline trace generation on vLLM: the rows of :func:`antidistill.generation.generate_traces`.

``generate_traces(llm, tokenizer, problems, settings)`` returns, per problem, ``id, question, answer,
completion, forced_answer, correct``, built the same way as the transformers path: the same prompt
(:func:`~antidistill.prompting.prompt_text`, tokenized without special tokens), the same answer
forcing (the trace cut at its own ``**Final Answer**``, then ``\\n\\n**Final Answer**\\n\\boxed{``
decoded greedily from the plain teacher for ``settings.answer_tokens`` tokens) and the same scoring.

Differences from the transformers path, by design:

- All problems go to vLLM at once (continuous batching); ``batch_size`` is not used.
- Sampling randomness: request ``i`` (0-based problem index) gets ``seed = settings.seed + i``,
  where the transformers path seeds the global RNG once per batch. Sampled traces are therefore
  reproducible but not the same tokens as the transformers path; greedy rows (``method="greedy"``,
  and every forced answer) are the same up to fp32 argmax ties.
- Multi-process sharding (``accelerate launch``) does not apply; vLLM parallelises itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...experiment.generation import answer_forcing_prefix
from ...prompting import ANSWER_FORCING, prompt_text
from ...experiment.scoring import forced_answer, is_correct
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


def _params(settings, max_tokens: int, mode: str, seed: int | None, eos: int | None, greedy: bool):
    from vllm import SamplingParams

    extra = {MODE_KEY: mode}
    if mode == "permutation":
        extra["permutation_seed"] = seed
    if greedy:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=[eos] if eos is not None else None,
                              extra_args=extra, skip_special_tokens=True)
    return SamplingParams(temperature=settings.tau, top_p=settings.top_p, top_k=settings.top_k or -1, seed=seed,
                          max_tokens=max_tokens, stop_token_ids=[eos] if eos is not None else None, extra_args=extra,
                          skip_special_tokens=True)


def _run(llm, tokenizer, prompts: list[str], params: list) -> list[str]:
    from vllm import TokensPrompt

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    # decode ourselves, as the transformers path does, so the text is byte-identical for the same ids
    return [tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True) for o in outs]


def generate_traces(llm, tokenizer, problems: Sequence[dict], settings, *, few_shot: list[dict] | None = None) -> list[dict]:
    """Sample a trace for each problem on vLLM, force an answer, and score it (see the module docstring)."""
    mode = {"greedy": "teacher", "temperature": "teacher", "antidistill": "antidistill",
            "permutation": "permutation"}[settings.method]
    if mode != "teacher" and settings.lam == 0.0:
        mode = "teacher"  # λ = 0 is eq. 1, temperature sampling
    eos = tokenizer.eos_token_id
    prompts = [prompt_text(tokenizer, p["question"], settings.system_prompt, few_shot) for p in problems]
    greedy = settings.method == "greedy"
    params = [_params(settings, settings.max_new_tokens, mode, settings.seed + i, eos, greedy)
              for i in range(len(prompts))]
    completions = _run(llm, tokenizer, prompts, params)
    forced_prompts = [p + answer_forcing_prefix(c) + ANSWER_FORCING for p, c in zip(prompts, completions)]
    forced = _run(llm, tokenizer, forced_prompts,
                  [_params(settings, settings.answer_tokens, "teacher", None, eos, True)] * len(prompts))
    rows = []
    for p, c, f in zip(problems, completions, forced):
        ans = forced_answer(f)
        rows.append({"id": p["id"], "question": p["question"], "answer": str(p["answer"]), "completion": c,
                     "forced_answer": ans, "correct": is_correct(ans, str(p["answer"]))})
    return rows
