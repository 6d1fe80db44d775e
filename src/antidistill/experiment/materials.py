"""What a run works on: the data splits, the three models' paths, tokenizers, teacher and proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..proxy import load_causal_lm
from ..tokenizer_compat import check_compatible_tokenizers, check_vocab_sizes, load_tokenizer
from ..toyworld.build import ToyWorldConfig, build_world
from .data import load_dataset_splits

ROLES = ("teacher", "proxy", "student")


@dataclass
class Materials:
    splits: dict[str, list[dict]]  # train, holdout, test
    paths: dict[str, str]  # teacher, proxy, student model folders
    tokenizers: dict[str, object]
    teacher: object
    proxy: object
    world_metrics: dict  # empty unless the toy world
    named_paths: dict[str, str] = field(default_factory=dict)  # toy world: every named proxy and student's folder


def load_materials(dataset: str, *, world: ToyWorldConfig, cache_dir: str, data_path: str | None = None,
                   models: dict[str, str | None] | None = None, limit_train: int | None = None,
                   limit_test: int | None = None, workers: int = 1, progress: bool = True,
                   tokenizer_dirs: dict[str, str] | None = None) -> Materials:
    """Build (or reuse) the toy world, or load a real dataset with the given model paths; validate both.

    ``tokenizer_dirs`` (role → folder) loads a role's tokenizer from a local folder instead of its
    model path. Raises ``ValueError`` before anything is written if a model path is missing or the
    proxy cannot read the teacher's token ids (tokenizers or vocabulary widths).
    """
    if dataset == "toy":
        w = build_world(world, cache_dir, progress=progress, workers=workers)
        metrics = w.metrics
        splits = {s: w.split(s) for s in ("train", "holdout", "test")}
        paths = {r: str(w.model_path(r)) for r in ROLES}
        named = {n: str(w.named_model_path(folder)) for n, (_, folder, _) in world.named_specs().items()}
        if limit_train:  # real datasets take the limits in load_dataset_splits
            splits["train"] = splits["train"][:limit_train]
            splits["holdout"] = splits["holdout"][: max(1, limit_train * 3 // 7)]
        if limit_test:
            splits["test"] = splits["test"][:limit_test]
    else:
        metrics, named = {}, {}
        splits = load_dataset_splits(dataset, data_path, seed=world.seed, limit_train=limit_train,
                                     limit_test=limit_test)
        paths = dict(models or {})
    for name, p in paths.items():
        if not Path(p).exists() and (dataset == "toy" or p.startswith((".", "/"))):
            raise ValueError(f"{name} model path {p!r} does not exist")
    tokenizers = {r: load_tokenizer((tokenizer_dirs or {}).get(r, p)) for r, p in paths.items()}
    check_compatible_tokenizers(tokenizers["teacher"], tokenizers["proxy"])
    teacher, proxy = load_causal_lm(paths["teacher"]), load_causal_lm(paths["proxy"])
    check_vocab_sizes(teacher, proxy, len(tokenizers["teacher"]))
    return Materials(splits, paths, tokenizers, teacher, proxy, metrics, named)
