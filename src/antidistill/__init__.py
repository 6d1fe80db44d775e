"""antidistill: antidistillation sampling (Savani et al., 2025) and everything to test it."""

__version__ = "0.1.0"

from .functional import antidistillation_logits, finite_difference_delta, permute_delta, sine_error  # noqa: E402
from .gradient import ProxyGradient, compute_proxy_gradient, load_gradient, save_gradient  # noqa: E402
from .processor import AntidistillationLogitsProcessor, PermutationLogitsProcessor, generate  # noqa: E402
from .proxy import ProxyDelta  # noqa: E402
from .settings import Eq11Settings, SamplingSettings  # noqa: E402
from .slots import SlotDelta, SlotKV  # noqa: E402

__all__ = [
    "AntidistillationLogitsProcessor",
    "PermutationLogitsProcessor",
    "ProxyDelta",
    "ProxyGradient",
    "Eq11Settings",
    "SamplingSettings",
    "SlotDelta",
    "SlotKV",
    "antidistillation_logits",
    "compute_proxy_gradient",
    "finite_difference_delta",
    "generate",
    "load_gradient",
    "permute_delta",
    "save_gradient",
    "sine_error",
]
