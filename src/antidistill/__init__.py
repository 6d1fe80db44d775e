"""antidistill: antidistillation sampling (Savani et al., 2025) and everything to test it."""

import os

# OpenMP threads that spin while waiting make a 2-thread process 10-26x slower beside one busy process
# on 2 cores (docs/benchmarks.md, "Contention"); sleeping waiters cost nothing measurable when the
# machine is quiet. It takes effect only if torch is not imported yet, and a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .functional import antidistillation_logits, ensemble_delta, finite_difference_delta, permute_delta, proxy_mix_logits, sine_error
from .gradient import ProxyGradient, compute_proxy_gradient, load_gradient, random_direction, save_gradient
from .mixing import ProxyMixLogitsProcessor
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
    "ProxyMixLogitsProcessor",
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
    "proxy_mix_logits",
    "random_direction",
    "save_gradient",
    "sine_error",
]
