"""Inference engines other than transformers' ``generate``.

``antidistill.engines.vllm`` runs antidistillation sampling inside vLLM (see ``docs/vllm.md``).
Nothing here imports vLLM at import time: each engine imports it lazily and raises one
:class:`MissingExtraError` naming the extra to install when it is absent.
"""

from __future__ import annotations


class MissingExtraError(ImportError):
    """An optional engine was asked for but its extra is not installed."""

