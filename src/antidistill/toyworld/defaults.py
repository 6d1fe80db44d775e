"""The toy world's default teacher, proxy and proxy gradient, for commands that need only those.

``antidistill serve`` with no model paths serves the demo world's teacher. This builds the same
artifacts as a demo sweep, without the sweep: the world from ``configs/demo.yaml``'s world config,
the teacher's greedy traces on the holdout split, and g = ∇θ of the proxy's NLL on them (eq. 7).
The gradient is cached atomically beside the world, keyed by the world and the trace settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def default_paths(cache_dir: str | Path, *, progress: bool = True, config: str | Path = DEMO_CONFIG) -> dict[str, str]:
    """``{"teacher", "proxy", "grad"}`` paths of the toy world in ``config``, built if missing."""
    import yaml

    from ..config import from_dict
    from ..settings import SamplingSettings
    from .build import ToyWorldConfig, build_world

    data = yaml.safe_load(Path(config).read_text()) or {}
    world_cfg = from_dict(ToyWorldConfig, data.get("world") or {}, "world")
    world = build_world(world_cfg, cache_dir, progress=progress, workers=int(data.get("workers", 1)))
    settings = SamplingSettings(method="greedy", max_new_tokens=int(data.get("max_new_tokens", 80)),
                                batch_size=int(data.get("gen_batch_size", 64)), seed=0)
    key = hashlib.sha256(json.dumps([world_cfg.key(), settings.max_new_tokens, settings.answer_tokens],
                                    sort_keys=True).encode()).hexdigest()[:12]
    grad_path = Path(cache_dir) / f"serve-grad-{key}" / "proxy_grad.safetensors"
    paths = {"teacher": str(world.model_path("teacher")), "proxy": str(world.model_path("proxy")),
             "grad": str(grad_path)}
    if not grad_path.is_file():
        _build_gradient(world, settings, grad_path, progress)
    return paths


def _build_gradient(world, settings, grad_path: Path, progress: bool) -> None:
    from ..generation import generate_traces
    from ..gradient import compute_proxy_gradient, save_gradient
    from ..proxy import load_causal_lm
    from ..tokenizers import load_tokenizer

    tok = load_tokenizer(world.model_path("teacher"))
    teacher = load_causal_lm(world.model_path("teacher"))
    traces = generate_traces(teacher, tok, world.split("holdout"), settings, progress=progress,
                             description="teacher traces on holdout")
    del teacher
    proxy = load_causal_lm(world.model_path("proxy"))
    result = compute_proxy_gradient(proxy, load_tokenizer(world.model_path("proxy")), traces, progress=progress)
    save_gradient(grad_path, result, extra={"source": "toyworld.defaults"})  # atomic (io_utils.atomic_path)
