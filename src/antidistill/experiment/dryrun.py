"""A sweep's plan without its weights: tokenizers and model configs load, teacher and proxy are
checked against each other, and the data, models and points are listed."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from ..tokenizer_compat import check_compatible_tokenizers, load_tokenizer
from .arms import ARM_NOTES
from .data import load_dataset_splits
from .sweepconfig import SweepConfig

ROLES = ("teacher", "proxy", "student")


def _model_config(path: str) -> dict | None:
    """A model's ``config.json`` as a dict, from its local folder or the hub (its cache, offline);
    None if there is none."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists():
        return None
    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError):
        return None


def dry_run(cfg: SweepConfig) -> list[str]:
    """Lines describing what ``cfg`` would run; raises ``ValueError`` where the real run would.

    Loads each role's tokenizer (from ``cfg.tokenizer_dirs`` or the model path) and its
    ``config.json`` where one exists, checks that the proxy reads the teacher's token ids, and that
    both output widths cover the teacher's tokens. Nothing is written and no weights are loaded.
    """
    lines = [f"sweep {cfg.name!r} → {cfg.run_dir}"]
    if cfg.dataset == "toy":
        lines.append(f"data: the toy world (built on first use under {cfg.cache_dir}, key {cfg.world.key()})")
        lines.append("models: the toy world's teacher, proxy and student")
    else:
        where = cfg.data_path or "the Hugging Face hub"
        if cfg.data_path:
            splits = load_dataset_splits(cfg.dataset, cfg.data_path, seed=cfg.world.seed, limit_train=cfg.limit_train,
                                         limit_test=cfg.limit_test)
            sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
            lines.append(f"data: {cfg.dataset} from {where} ({sizes})")
        else:
            lines.append(f"data: {cfg.dataset} from {where} (not downloaded in a dry run)")
        toks = {}
        for role in ROLES:
            source = cfg.tokenizer_dirs.get(role, getattr(cfg, role))
            toks[role] = load_tokenizer(source)
            mc = _model_config(getattr(cfg, role))  # the model's own, never a tokenizer folder's
            shape = ("config.json: none found (vocabulary width checked when the weights load)" if mc is None else
                     f"{mc.get('model_type')}, vocab {mc.get('vocab_size')}, hidden {mc.get('hidden_size')}, "
                     f"{mc.get('num_hidden_layers')} layers")
            width = None if mc is None else mc.get("vocab_size")
            if role in ("teacher", "proxy") and width is not None and int(width) < len(toks["teacher"]):
                raise ValueError(f"{role} {getattr(cfg, role)!r}: vocab_size {mc['vocab_size']} is smaller than the "
                                 f"teacher tokenizer's {len(toks['teacher']):,} tokens")
            lines.append(f"{role}: {getattr(cfg, role)} (tokenizer {source}, {len(toks[role]):,} tokens; {shape})")
        lines.append("teacher/proxy tokenizers: " + check_compatible_tokenizers(toks["teacher"], toks["proxy"]).summary())
    s = cfg.sampling
    lines.append(f"sampling: τ {s.tau:g}, ε {s.eps:g} ({s.difference}), top-p {s.top_p:g}, "
                 f"{s.max_new_tokens} new tokens, batch {s.batch_size}")
    if len(cfg.panel()) > 1:
        lines.append(f"students: {', '.join(cfg.panel())} (every point's traces are distilled into each)")
    if cfg.grid == "calibrated":
        c = cfg.calibration
        lines.append(f"points: from the run's calibration: arms {cfg.expand_arms(c.arms)} at targets {c.targets} (points below "
                     f"greedy) × seeds {cfg.seeds}, plus greedy" if cfg.include_greedy else
                     f"points: from the run's calibration: arms {cfg.expand_arms(c.arms)} at targets {c.targets} × "
                     f"seeds {cfg.seeds}")
        if cfg.replicate.seeds:
            lines.append(f"replicates: seeds {cfg.replicate.seeds} again at targets {cfg.replicate.targets} (every arm, "
                         f"naive distiller into the base student only)")
    else:
        points = cfg.points()
        by_arm: dict[str, list[float]] = {}
        for method, param, _seed in points:
            by_arm.setdefault(method, [])
            if param not in by_arm[method]:
                by_arm[method].append(param)
        arms = "; ".join(f"{m} {', '.join(f'{p:g}' for p in ps)}" for m, ps in by_arm.items())
        lines.append(f"points: {len(points)} ({len(points) // len(cfg.seeds)} per seed: {arms}; seeds {cfg.seeds})")
    used = cfg.calibration.arms if cfg.grid == "calibrated" else [a for a, grid in cfg.arms.items() if grid]
    lines += [f"arm {a}: {ARM_NOTES[a]}" for a in used if a in ARM_NOTES]
    if cfg.grid == "calibrated" and "proxy_mix" in used:
        lines.append(f"calibration of proxy_mix: γ on {cfg.calibration.gammas}, then {cfg.calibration.refine} "
                     f"bisection(s) per target; λ arms: λ from {cfg.calibration.lam_range[0]:g} ×{cfg.calibration.lam_factor:g}")
    d = cfg.distill
    lines.append(f"distillation: {'LoRA r ' + str(d.lora_r) if d.lora else 'full'}, lr {d.lr:g}, {d.epochs:g} epochs, "
                 f"batch {d.batch_size}; engine {cfg.engine}, {cfg.workers} worker(s)")
    return lines
