"""Incremental detokenization with OpenAI stop semantics, run by each request's handler (not the model thread).

:class:`TextStream` turns a request's generated token ids into text one token at a time with
``tokenizers``' ``DecodeStream`` (constant work per token; the engine used to re-decode the whole
output at every token on its model thread, a cost quadratic in the output length). It applies the
request's stop strings as OpenAI and vLLM do: the text up to the first stop string is returned, the
stop string itself and everything after it are not. Text that might be the start of a stop string
is held back until the next token decides it, so a streamed client never sees part of one.

Example:
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> ts = TextStream(tok, stop=["!"])          # doctest: +SKIP
    >>> [ts.push(i) for i in tok("hi there!", add_special_tokens=False)["input_ids"]]  # doctest: +SKIP
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class TextStream:
    """One request's incremental text.

    Args:
        tokenizer: a transformers tokenizer. Fast tokenizers decode through their ``tokenizers`` backend;
            others fall back to decoding a short window of recent ids (still constant work per token).
        stop: stop strings (may be empty).
    """

    WINDOW = 6  # ids of context for the fallback decoder

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self.pending = ""  # decoded text not yet returned: a possible start of a stop string
        self.stopped = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._backend, self._stream = backend, DecodeStream(skip_special_tokens=True)
        else:
            self._backend, self._stream, self._tok, self._ids = None, None, tokenizer, []

    def _decode(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, int(token_id)) or ""
        prev = self._tok.decode(self._ids[-self.WINDOW:], skip_special_tokens=True)
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids[-self.WINDOW - 1:], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(prev):
            self._ids.pop()  # an incomplete character: retry with the next id
            return ""
        return text[len(prev):]

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` makes final (possibly ""). After a stop string, :attr:`stopped` is True
        and the returned text ends just before it."""
        if self.stopped:
            return ""
        buf = self.pending + self._decode(token_id)
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return buf[:cut]
        hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        out, self.pending = self.pending, ""
        return out
