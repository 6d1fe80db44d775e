"""Names shared by the serving guard, the launcher and the offline path (no vLLM import here).

The request policy itself is :mod:`antidistill.serving_policy`, one for both servers.
"""

from __future__ import annotations

from ...serving_policy import OPERATOR_ONLY  # noqa: F401  (validate_params refuses these in vllm_xargs)

SERVE_TAU_ENV = "ANTIDISTILL_VLLM_SERVE_TAU"  # τ for ServeLogitsProcessor.validate_params, set by the launcher
SERVE_MIN_TOP_P_ENV = "ANTIDISTILL_VLLM_SERVE_MIN_TOP_P"  # the operator's floor on a request's top_p (default 1)
POLICY_ENV = "ANTIDISTILL_VLLM_POLICY"  # the ServingPolicy's limits as JSON, set by the launcher
MODE_KEY = "antidistill_mode"  # offline only: extra_args key choosing eq. 11, permutation or the plain teacher
MODES = ("antidistill", "permutation", "teacher")
