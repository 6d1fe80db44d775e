"""Names shared by the serving guard, the launcher and the offline path (no vLLM import here)."""

from __future__ import annotations

SERVE_TAU_ENV = "ANTIDISTILL_VLLM_SERVE_TAU"  # τ for ServeLogitsProcessor.validate_params, set by the launcher
SERVE_MIN_TOP_P_ENV = "ANTIDISTILL_VLLM_SERVE_MIN_TOP_P"  # the operator's floor on a request's top_p (default 1)
OPERATOR_ONLY = frozenset(
    {"lam", "lambda", "eps", "epsilon", "difference", "proxy", "grad", "gradient", "antidistill", "antidistillation"}
)
MODE_KEY = "antidistill_mode"  # offline only: extra_args key choosing eq. 11, permutation or the plain teacher
MODES = ("antidistill", "permutation", "teacher")
