"""Antidistillation sampling inside vLLM (see ``docs/vllm.md``).

Importing this package does not import vLLM; the functions below do, and raise one
:class:`~antidistill.engines.MissingExtraError` naming ``pip install -e ".[vllm]"`` when it is absent.
"""

from __future__ import annotations

from .setup import INSTALL_HINT, VllmSettings, build_llm, check_models, require_vllm, write_composite

__all__ = ["INSTALL_HINT", "VllmSettings", "build_llm", "check_models", "require_vllm", "write_composite"]
