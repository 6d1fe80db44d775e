"""Chat formatting shared by generation, the proxy gradient, distillation and evaluation."""

from __future__ import annotations

import torch

DEFAULT_SYSTEM_PROMPT = "Think step by step."
ANSWER_FORCING = "\n\n**Final Answer**\n\\boxed{"


def chat_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def prompt_text(tokenizer, question: str, system_prompt: str | None = None, few_shot: list[dict] | None = None) -> str:
    """The chat-templated prompt, ending where the assistant's completion begins.

    ``few_shot`` examples (``question``/``completion``) become earlier user/assistant turns: this
    is how untrained base students are scored, as in the paper.
    """
    msgs = chat_messages(question, system_prompt)
    if few_shot:
        shots = []
        for ex in few_shot:
            shots += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["completion"]}]
        msgs = msgs[:-1] + shots + msgs[-1:]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def encode_example(
    tokenizer, question: str, completion: str, system_prompt: str | None = None, max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids of prompt + completion + EOS, with labels -100 on the prompt (completion-only loss)."""
    prompt_ids = tokenizer(prompt_text(tokenizer, question, system_prompt), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + completion_ids
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_right(examples: list[dict], pad_id: int):
    """Right-pad ``input_ids``/``labels`` examples → ``(ids, labels, attention_mask)`` long tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return ids, labels, mask
