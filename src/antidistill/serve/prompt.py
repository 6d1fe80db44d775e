"""Request text to token ids, with user text encoded as text: no special token can be injected.

The chat template is rendered with each message's content replaced by a random marker. The text
between markers is the template's own and is tokenized normally (its control tokens are meant);
each content is tokenized with ``split_special_tokens=True``, so ``<|assistant|>`` typed by a user
is ordinary text. As a second guard, content ids that are control ids (the tokenizer's special
tokens other than ``unk``) give a 400.

Size: a token covers at most ``max_token_bytes`` UTF-8 bytes, so a text of more than
``max_prompt_tokens · max_token_bytes · 4`` bytes is over the token cap without tokenizing it (the
factor 4 absorbs normalizers that shrink text).
"""

from __future__ import annotations

import re
import secrets

from .errors import APIError


class PromptEncoder:
    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tok = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        specials = set(tokenizer.all_special_ids)
        for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                specials.add(int(tid))
        self.control_ids = frozenset(specials - {tokenizer.unk_token_id})
        vocab = len(tokenizer)
        self.max_token_bytes = max(4, max(len(tokenizer.decode([i]).encode("utf-8", "replace")) for i in range(vocab)))
        self._check_template()

    def _check_template(self) -> None:
        if getattr(self.tok, "chat_template", None) is None:
            return
        probe = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
        text, markers = self._render(probe)
        if not all(m in text for m in markers):
            raise ValueError("the chat template transforms message content; the server cannot keep user text "
                             "apart from control tokens with it")

    def _render(self, messages: list[dict]) -> tuple[str, list[str]]:
        nonce = secrets.token_hex(8)
        markers = [f"\x1d{nonce}:{i}\x1d" for i in range(len(messages))]
        marked = [{"role": m["role"], "content": mk} for m, mk in zip(messages, markers)]
        return self.tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False), markers

    def check_size(self, texts: list[str], param: str) -> None:
        n = sum(len(t.encode("utf-8")) for t in texts)
        if n > self.max_prompt_tokens * self.max_token_bytes * 4:
            raise APIError(400, f"prompt is over the limit of {self.max_prompt_tokens} tokens", param=param,
                           code="context_length_exceeded")

    def text_ids(self, text: str, param: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if self.control_ids.intersection(ids):
            raise APIError(400, "the text encodes to control tokens", param=param)
        return ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """``messages``: ``{"role", "content": str}`` → the prompt's ids, generation prompt included."""
        self.check_size([m["content"] for m in messages], "messages")
        text, markers = self._render(messages)
        index = {mk: i for i, mk in enumerate(markers)}
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, markers)) + ")", text):
            if piece in index:
                ids += self.text_ids(messages[index[piece]]["content"], "messages")
            elif piece:
                ids += self.tok(piece, add_special_tokens=False)["input_ids"]
        return self._capped(ids, "messages")

    def completion_ids(self, prompt: str) -> list[int]:
        self.check_size([prompt], "prompt")
        ids = self.text_ids(prompt, "prompt")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return self._capped(ids, "prompt")

    def _capped(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", param=param,
                           code="context_length_exceeded")
        return ids
