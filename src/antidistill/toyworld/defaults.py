"""The default toy-world artifacts that the server and ``check-fd`` use when no paths are given.

They are the demo's: the world of ``configs/demo.yaml``, the teacher's greedy traces on its holdout
split, and the proxy gradient g over them, built once and cached beside the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import load_config
from ..experiment.data import read_jsonl, write_jsonl
from ..experiment.generation import generate_traces
from ..experiment.rundir import stage
from ..experiment.sweep import SweepConfig
from ..gradient import compute_proxy_gradient, save_gradient
from ..proxy import load_causal_lm
from ..tokenizers import load_tokenizer
from .build import build_world


@dataclass
class DefaultArtifacts:
    teacher: str
    proxy: str
    grad: str
    holdout_traces: str  # JSONL of {question, completion, ...}: what g was computed on


def default_artifacts(cache_dir: str | Path = ".cache/antidistill", *, progress: bool = True) -> DefaultArtifacts:
    """Build (or reuse from ``cache_dir``) the demo world, its holdout traces and its g."""
    demo = load_config(SweepConfig, resources.files("antidistill") / "configs" / "demo.yaml")
    world = build_world(demo.world, cache_dir, progress=progress, workers=demo.workers)
    root = world.root / "defaults"
    teacher, proxy = str(world.model_path("teacher")), str(world.model_path("proxy"))

    def traces(path):
        rows = generate_traces(load_causal_lm(teacher), load_tokenizer(teacher), world.split("holdout"),
                               demo.settings_for("greedy", 0.0, 0), progress=progress,
                               description="teacher traces on holdout")
        write_jsonl(path, rows)

    def gradient(path):
        result = compute_proxy_gradient(load_causal_lm(proxy), load_tokenizer(proxy), read_jsonl(traces_path),
                                        progress=progress)
        save_gradient(path, result, extra={"world": world.root.name})

    traces_path = stage(root / "holdout_traces.jsonl", traces)
    grad_path = stage(root / "proxy_grad.safetensors", gradient)
    return DefaultArtifacts(teacher, proxy, str(grad_path), str(traces_path))
