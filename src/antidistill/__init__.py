"""antidistill: antidistillation sampling (Savani et al., 2025) and everything to test it."""

from .functional import antidistillation_logits, ensemble_delta, finite_difference_delta, permute_delta, sine_error
from .gradient import ProxyGradient, compute_proxy_gradient, load_gradient, save_gradient
from .processor import AntidistillationLogitsProcessor, PermutationLogitsProcessor, generate
from .proxy import EnsembleDelta, ProxyDelta
from .settings import Eq11Settings, SamplingSettings
from .slots import SlotDelta, SlotKV
from .version import __version__

__all__ = [
    "AntidistillationLogitsProcessor",
    "EnsembleDelta",
    "PermutationLogitsProcessor",
    "ProxyDelta",
    "ProxyGradient",
    "Eq11Settings",
    "SamplingSettings",
    "SlotDelta",
    "SlotKV",
    "antidistillation_logits",
    "compute_proxy_gradient",
    "ensemble_delta",
    "finite_difference_delta",
    "generate",
    "load_gradient",
    "permute_delta",
    "save_gradient",
    "sine_error",
]
