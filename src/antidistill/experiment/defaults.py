"""The default toy-world artifacts that the server and ``check-fd`` use when no paths are given.

They are a demo sweep's, without the sweep: the world of ``configs/demo.yaml``, the teacher's greedy
traces on its holdout split, and the proxy gradient g over them (eq. 7), built once and cached
atomically beside the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import load_config
from ..generation import generate_traces
from ..gradient import compute_proxy_gradient, save_gradient
from ..io_utils import read_jsonl, write_jsonl
from ..proxy import load_causal_lm
from ..tokenizer_compat import load_tokenizer
from ..toyworld.build import build_world
from .rundir import stage
from .sweepconfig import SweepConfig

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class DefaultArtifacts:
    teacher: str
    proxy: str
    grad: str
    holdout_traces: str  # JSONL of {question, completion, ...}: what g was computed on


def default_artifacts(cache_dir: str | Path, *, progress: bool = True,
                      config: str | Path = DEMO_CONFIG) -> DefaultArtifacts:
    """Build (or reuse from ``cache_dir``) the world of the sweep ``config``, its holdout traces and g.

    The traces use the config's greedy settings (as the sweep's holdout stage does), so the gradient
    equals a sweep's of the same config.
    """
    cfg = load_config(SweepConfig, config)
    world = build_world(cfg.world, cache_dir, progress=progress, workers=cfg.workers)
    greedy = cfg.settings_for("greedy", 0.0, 0)
    root = world.root / f"defaults-{greedy.max_new_tokens}-{greedy.answer_tokens}"
    teacher, proxy = str(world.model_path("teacher")), str(world.model_path("proxy"))

    def traces(path):
        rows = generate_traces(load_causal_lm(teacher), load_tokenizer(teacher), world.split("holdout"), greedy,
                               progress=progress, description="teacher traces on holdout")
        write_jsonl(path, rows)

    def gradient(path):
        result = compute_proxy_gradient(load_causal_lm(proxy), load_tokenizer(teacher), read_jsonl(traces_path),
                                        progress=progress)
        save_gradient(path, result, extra={"source": "experiment.defaults", "world": world.root.name})

    traces_path = stage(root / "holdout_traces.jsonl", traces)
    grad_path = stage(root / "proxy_grad.safetensors", gradient)
    return DefaultArtifacts(teacher, proxy, str(grad_path), str(traces_path))
