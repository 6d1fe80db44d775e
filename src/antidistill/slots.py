"""Per-request ("slot") KV state for Hugging Face causal LMs: continuous batching for teacher and proxy.

:class:`~antidistill.proxy.ProxyDelta` keeps one KV cache per fixed batch: every row starts
together and the batch lives until its longest row ends. A server that lets requests join and
leave between decode steps needs the KV state of each request on its own. Here each request is a
*slot*, named by any hashable key:

* :class:`SlotKV` holds the slots of one model. ``forward([(key, new_ids), ...])`` appends each
  slot's new tokens and returns ``(B, V)`` float32 logits after each slot's last token. A key it
  has not seen is a new slot whose ``new_ids`` are its prompt (prefill); a known key continues.
  ``free(key)`` ends a slot.
* :class:`SlotDelta` is Δ̂ (eq. 10 or its central form) with one :class:`SlotKV` per perturbed
  proxy: θ+εg and θ−εg (``central``) or θ+εg and θ (``forward``).
* :func:`forward_all` steps several :class:`SlotKV` (teacher and proxies) as one transaction:
  if any model raises, every model is rolled back to where it was.

Layout. The live slots of a model are rows of one batched KV cache, each row's tokens
right-aligned, with an attention mask marking real entries and explicit position ids (each slot
counts its positions from 0, as if it ran alone). While the same slots decode one token each,
the batched cache is reused as is (the fast path, the same work as ``generate``). When the set of
slots changes, every row's real entries are read out (spilled) and a new left-padded batch is
built; a new slot is prefilled in a forward of its own, with the other new slots of that step.

``jvp`` keeps dual (primal, tangent) caches and is not supported here: :class:`SlotDelta` raises
``ValueError`` for it. Sliding-window attention layers are not supported either (the spill would
need the window's full history).

Equality with a full recompute: slot logits differ from a no-cache, unpadded forward of the same
tokens only by float32 round-off (different matmul shapes and summation order), about 1e-6 of the
logit scale; Δ̂ divides a difference of such logits by ε (2ε central), so its error is about
1e-6·|z|/ε. ``tests/test_slots.py`` checks both against ``tests/conftest.py``'s brute-force
references.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from transformers import DynamicCache

from .functional import finite_difference_delta
from .proxy import ProxyDelta, cache_kwarg

Feed = tuple[Hashable, Sequence[int]]


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # pragma: no cover (older transformers)


class SlotKV:
    """The KV state of one causal LM, one slot per request (see the module doc).

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``), in eval mode.
        pad_token_id: the id fed at padded input positions (masked out; any valid id).
    """

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int = 0):
        cfg = model.config
        if any("sliding" in str(t) for t in (getattr(cfg, "layer_types", None) or [])) or (
                getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)):
            raise ValueError(f"{type(model).__name__} uses sliding-window attention, which KV slots do not support")
        self.model = model.eval()
        self.pad_token_id = int(pad_token_id)
        self._cache_kw = cache_kwarg(model)
        self._len: dict[Hashable, int] = {}  # real tokens of each live slot
        self._store: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # (H, L, D) per layer
        self._order: list[Hashable] = []  # rows of the batched cache
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, W) long
        self.stats = {"fast_steps": 0, "rebuilds": 0, "prefills": 0}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __contains__(self, key) -> bool:
        return key in self._len

    def __len__(self) -> int:
        return len(self._len)

    def length(self, key) -> int:
        """Tokens held for ``key``."""
        return self._len[key]

    def free(self, key) -> None:
        """End slot ``key`` (no-op if unknown). Its row leaves the batch at the next rebuild."""
        self._len.pop(key, None)
        self._store.pop(key, None)
        if key in self._order:  # the batch no longer matches its keys: the next step rebuilds
            self._order = [object() if k == key else k for k in self._order]

    def truncate(self, key, length: int) -> None:
        """Keep the first ``length`` tokens of slot ``key`` (0 frees it): rolls back a step."""
        if length <= 0:
            self.free(key)
            return
        self._spill()
        self._store[key] = [(k[:, :length], v[:, :length]) for k, v in self._store[key]]
        self._len[key] = min(self._len[key], length)

    # --- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, feeds: Sequence[Feed]) -> torch.Tensor:
        """Append each slot's new tokens; ``(B, V)`` float32 logits after each slot's last token.

        ``feeds``: ``(key, new_ids)`` pairs, keys distinct, ``new_ids`` non-empty. Unknown keys are
        new slots (prefilled); known keys continue. On an exception no slot changes.
        """
        keys = [k for k, _ in feeds]
        if len(set(keys)) != len(keys):
            raise ValueError("each slot may appear once per forward")
        if any(len(ids) == 0 for _, ids in feeds):
            raise ValueError("every slot needs at least one new token")
        old = [(i, k, list(ids)) for i, (k, ids) in enumerate(feeds) if k in self._len]
        new = [(i, k, list(ids)) for i, (k, ids) in enumerate(feeds) if k not in self._len]
        out: list[torch.Tensor | None] = [None] * len(feeds)
        prefilled = {}
        if new:  # computed first, committed last: nothing shared is touched until every part succeeded
            logits, kv = self._run([[] for _ in new], [ids for _, _, ids in new], [0] * len(new))
            self.stats["prefills"] += 1
            for j, (i, k, ids) in enumerate(new):
                out[i] = logits[j]
                prefilled[k] = ([(K[j, :, -len(ids):], V[j, :, -len(ids):]) for K, V in kv], len(ids))
        if old:
            logits = self._decode([k for _, k, _ in old], [ids for _, _, ids in old])
            for j, (i, _, _) in enumerate(old):
                out[i] = logits[j]
        for k, (layers, n) in prefilled.items():
            self._store[k], self._len[k] = layers, n
        return torch.stack(out) if out else torch.empty(0)

    def _decode(self, keys: list, new_ids: list[list[int]]) -> torch.Tensor:
        if (self._cache is not None and len(keys) == len(self._order) and set(keys) == set(self._order)
                and all(len(x) == 1 for x in new_ids)):
            # the same slots, one token each: step the batch in its own row order
            by_key = dict(zip(keys, new_ids))
            logits = self._fast_step(self._order, [by_key[k] for k in self._order])
            row = {k: i for i, k in enumerate(self._order)}
            return logits[[row[k] for k in keys]]
        self._spill()
        past = [self._store[k] for k in keys]
        lens = [self._len[k] for k in keys]
        logits, kv, cache, mask = self._run(past, new_ids, lens, keep=True)
        # commit: the new batch is authoritative for these slots
        self.stats["rebuilds"] += 1
        for k, ids in zip(keys, new_ids):
            self._len[k] += len(ids)
            self._store.pop(k, None)
        self._order, self._cache, self._mask = list(keys), cache, mask
        return logits

    def _fast_step(self, keys: list, new_ids: list[list[int]]) -> torch.Tensor:
        dev = self.device
        width = self._mask.shape[1]
        ids = torch.tensor(new_ids, dtype=torch.long, device=dev)
        mask = torch.cat([self._mask, self._mask.new_ones(len(keys), 1)], dim=1)
        pos = torch.tensor([[self._len[k]] for k in keys], dtype=torch.long, device=dev)
        try:
            logits = self._call(ids, mask, pos, self._cache)
        except BaseException:
            self._cache.crop(width)  # layers that appended before the failure
            raise
        self.stats["fast_steps"] += 1
        for k in keys:
            self._len[k] += 1
        self._mask = mask
        return logits

    def _spill(self) -> None:
        """Copy every live row of the batched cache into per-slot storage; drop the batch."""
        if self._cache is None:
            return
        n_layers = len(self._cache.layers) if hasattr(self._cache, "layers") else len(self._cache.key_cache)
        kv = [_layer_kv(self._cache, i) for i in range(n_layers)]
        for row, key in enumerate(self._order):
            if key not in self._len or key in self._store:
                continue
            sel = self._mask[row].bool()
            self._store[key] = [(K[row][:, sel], V[row][:, sel]) for K, V in kv]
        self._order, self._cache, self._mask = [], None, None

    def _run(self, past: list, new_ids: list[list[int]], lens: list[int], keep: bool = False):
        """One forward of rows with per-slot ``past`` KV (lists of per-layer (H, L, D)) and new ids.

        Past is left-padded to the longest, new ids left-padded to the longest; padded positions
        are masked and each row's positions continue from its own length.
        """
        dev = self.device
        b = len(new_ids)
        lp = max(lens) if lens else 0
        ln = max(len(x) for x in new_ids)
        mask = torch.zeros(b, lp + ln, dtype=torch.long, device=dev)
        ids = torch.full((b, ln), self.pad_token_id, dtype=torch.long, device=dev)
        pos = torch.zeros(b, ln, dtype=torch.long, device=dev)
        for i, (x, n) in enumerate(zip(new_ids, lens)):
            mask[i, lp - n : lp] = 1
            mask[i, lp + ln - len(x) :] = 1
            ids[i, ln - len(x) :] = torch.tensor(x, dtype=torch.long)
            pos[i, ln - len(x) :] = torch.arange(n, n + len(x))
        cache = DynamicCache(config=self.model.config)
        if lp > 0:
            for layer in range(len(past[0])):
                h, _, d = past[0][layer][0].shape
                dtype = past[0][layer][0].dtype
                K = torch.zeros(b, h, lp, d, dtype=dtype, device=dev)
                V = torch.zeros_like(K)
                for i, row in enumerate(past):
                    k, v = row[layer]
                    if k.shape[1]:
                        K[i, :, lp - k.shape[1] :] = k
                        V[i, :, lp - v.shape[1] :] = v
                cache.update(K, V, layer)
        logits = self._call(ids, mask, pos, cache)
        n_layers = len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)
        kv = [_layer_kv(cache, i) for i in range(n_layers)]
        if keep:
            return logits, kv, cache, mask
        return logits, kv

    def _call(self, ids, mask, pos, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        return out.logits[:, -1].float()


def forward_all(kvs: Sequence[SlotKV], feeds: Sequence[Feed]) -> list[torch.Tensor]:
    """Step every :class:`SlotKV` with the same feeds, as one transaction.

    Returns one ``(B, V)`` logits tensor per model. If any model raises, the models that already
    stepped are rolled back (new slots freed, continued slots truncated), and the error re-raised.
    """
    before = [{k: kv._len.get(k, 0) for k, _ in feeds} for kv in kvs]
    outs = []
    try:
        for kv in kvs:
            outs.append(kv.forward(feeds))
    except BaseException:
        for kv, lens in zip(kvs[: len(outs)], before):
            for k, n in lens.items():
                kv.truncate(k, n)
        raise
    return outs


class SlotDelta:
    """Δ̂ for slots: the finite-difference estimate (eq. 10, or its central form) per request.

    Args: as :class:`~antidistill.proxy.ProxyDelta` (``difference`` ``"central"`` or ``"forward"``).
    ``kvs`` are the :class:`SlotKV` of θ+εg and θ−εg (central) or θ+εg and θ (forward); pass them
    with the teacher's to :func:`forward_all`, then combine with :meth:`from_logits`, or call
    :meth:`forward`.
    """

    def __init__(self, proxy, grad, *, eps: float, difference: str = "central", pad_token_id: int = 0):
        if difference == "jvp":
            raise ValueError(
                "difference='jvp' keeps dual (primal, tangent) KV caches, which per-request slots do not "
                "support; serve with difference='central' or 'forward'"
            )
        pd = ProxyDelta(proxy, grad, eps=eps, difference=difference, pad_token_id=pad_token_id)
        self.eps, self.difference, self.vocab_size = pd.eps, pd.difference, pd.vocab_size
        self.kvs = [SlotKV(m, pad_token_id=pad_token_id) for m in pd.models]

    def from_logits(self, logits_plus: torch.Tensor, logits_other: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` Δ̂ from the two proxies' logits."""
        return finite_difference_delta(logits_plus, logits_other, self.eps, self.difference)

    def forward(self, feeds: Sequence[Feed]) -> torch.Tensor:
        """Step both proxies (transactionally) and return ``(B, V)`` Δ̂ after each slot's last token."""
        plus, other = forward_all(self.kvs, feeds)
        return self.from_logits(plus, other)

    def free(self, key) -> None:
        for kv in self.kvs:
            kv.free(key)
