"""Build (or reuse) the toy world: data splits, tokenizer, and three models trained from scratch.

The world is cached under ``<cache>/toyworld-<hash of its config>/`` and written atomically, so a
second run with the same config reuses it and an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from concurrent.futures import as_completed
from dataclasses import asdict, field
from pathlib import Path
from typing import Literal

import torch
from pydantic.dataclasses import dataclass
from transformers import get_cosine_schedule_with_warmup

from ..generation import generate_traces
from ..io_utils import atomic_dir, provenance, read_jsonl, write_jsonl
from ..progress import track
from ..prompting import ANSWER_FORCING, DEFAULT_SYSTEM_PROMPT, encode_example, pad_right
from ..proxy import load_causal_lm
from ..runtime import worker_pool
from ..settings import CONFIG, SamplingSettings
from ..tokenizer_compat import load_tokenizer
from .models import ModelSpec, build_model
from .task import arithmetic_chains, chat_arithmetic, generic_text, make_splits, random_problem, solve, story_text
from .tokenizer import build_tokenizer


@dataclass(config=CONFIG)
class TrainSpec:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30


NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(config=CONFIG)
class ZooConfig:
    """The proxy zoo and the student panel: further base models pretrained on the generic toy text exactly
    like the student (same data, ``pretrain`` recipe and tokenizer), each with its own seed.

    ``proxies``: name → spec of the models an owner may use as proxies (beside the shipped proxy, named
    ``shipped_proxy``); ``panel``: name → spec of further students (beside the base student, named
    ``base_student``); every arm's traces are distilled into each of them.
    """

    proxies: dict[str, ModelSpec] = field(default_factory=dict)
    panel: dict[str, ModelSpec] = field(default_factory=dict)
    shipped_proxy: str = "qwen2-small"  # the name of the world's own proxy (role "proxy")
    base_student: str = "gpt2"  # the name of the world's own student (role "student")

    def __post_init__(self):
        names = [*self.proxies, *self.panel, self.shipped_proxy, self.base_student]
        bad = sorted(n for n in names if not n or set(n) - NAME_CHARS)
        if bad:
            raise ValueError(f"world.zoo: model names use a-z, 0-9, '-' and '_' only, got {bad}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"world.zoo: every proxy and panel student needs its own name, {dup} repeats")

    def key(self, world_key: str) -> str:
        """The zoo's cache key: the world's key and the zoo's config."""
        text = json.dumps({"world": world_key, "zoo": asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def seed(self, world_seed: int, kind: str, name: str) -> int:
        """A zoo model's own training seed: from the world's seed and the model's kind and name alone,
        so adding a model to the zoo leaves every other model's seed (and weights) as they were."""
        return world_seed + 1000 + int(hashlib.sha256(f"{kind}/{name}".encode()).hexdigest()[:6], 16)


@dataclass(config=CONFIG)
class ToyWorldConfig:
    # the build recipe's version: part of the cache key, raised whenever the same config would build
    # different weights or splits (2: transformers' cosine schedule; 3: students that learn from the
    # teacher: 3,000 training problems, a fixed 300-problem holdout, 4,000 test problems)
    format: Literal[3] = 3  # only the current recipe can be built
    seed: int = 0
    n_train_pool: int = 3300  # train (traces to distil) and holdout (for g and the calibration)
    n_holdout: int | None = 300  # holdout problems taken from the pool (None: 30% of it)
    n_test: int = 4000
    n_world_eval: int = 1000  # the first N test problems, for the build's own greedy-teacher and base-student metrics
    n_teacher_problems: int = 20000  # the teacher's own training problems, disjoint from every split
    n_generic: int = 6000  # generic toy-language lines for pretraining
    n_stories: int = 6000  # problems told as prose with their computation (pretraining), disjoint from every split
    n_chat: int = 3000  # arithmetic requests in the chat format (pretraining), see task.chat_arithmetic
    pack_length: int = 128  # pretraining sequences; longer than any task example, so every position is trained
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec("llama", 128, 3, 4, 256))
    proxy: ModelSpec = field(default_factory=lambda: ModelSpec("qwen2", 64, 2, 4, 128))
    student: ModelSpec = field(default_factory=lambda: ModelSpec("gpt2", 128, 3, 4, 256))
    teacher_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=1600, lr=3e-3, warmup=60))
    # student and proxy pretraining: more, smaller steps than the teacher's (docs/results/tuning.md)
    pretrain: TrainSpec = field(default_factory=lambda: TrainSpec(steps=2000, batch_size=16, lr=4e-3, warmup=40))
    # opt-in: the proxy zoo and student panel (issue 16), built beside the world under its own key; a world
    # without one keeps the key it had before zoos existed
    zoo: ZooConfig | None = None

    def __post_init__(self):
        if self.n_holdout is not None and not 0 < self.n_holdout < self.n_train_pool:
            raise ValueError(f"world.n_holdout must be in (0, n_train_pool={self.n_train_pool}), "
                             f"got n_holdout={self.n_holdout}")
        if self.n_world_eval < 1:
            raise ValueError(f"world.n_world_eval must be ≥ 1, got n_world_eval={self.n_world_eval}")

    def key(self) -> str:
        """The world's cache key: its config without the zoo (the zoo has its own key, ``ZooConfig.key``)."""
        data = asdict(self)
        del data["zoo"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def zoo_or_default(self) -> ZooConfig:
        """The zoo, or (no zoo) an empty one that names the shipped proxy and the base student."""
        return self.zoo if self.zoo is not None else ZooConfig()

    def named_specs(self) -> dict[str, tuple[str, str, ModelSpec]]:
        """Every named proxy and student: name → (kind "proxy" or "student", folder under the world, spec).

        The shipped proxy and the base student are the world's own roles; the zoo's models lie in its folder."""
        zoo = self.zoo_or_default()
        out = {zoo.shipped_proxy: ("proxy", "proxy", self.proxy), zoo.base_student: ("student", "student", self.student)}
        out |= {n: ("proxy", f"zoo/proxies/{n}", s) for n, s in zoo.proxies.items()}
        out |= {n: ("student", f"zoo/panel/{n}", s) for n, s in zoo.panel.items()}
        return out


@dataclasses.dataclass
class World:
    root: Path
    config: dict
    metrics: dict
    zoo_root: Path | None = None  # the zoo's folder (``<root>/zoo-<zoo key>``), when the config has a zoo

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer"

    def model_path(self, role: str) -> Path:
        return self.root / role

    def split(self, name: str) -> list[dict]:
        return read_jsonl(self.root / "data" / f"{name}.jsonl")

    @classmethod
    def load(cls, root: Path, zoo_root: Path | None = None) -> World:
        info = json.loads((root / "world.json").read_text())
        metrics = dict(info["metrics"])
        if zoo_root is not None:
            metrics |= json.loads((zoo_root / "zoo.json").read_text())["metrics"]
        return cls(root=root, config=info["config"], metrics=metrics, zoo_root=zoo_root)

    def named_model_path(self, folder: str) -> Path:
        """A named model's folder (``ToyWorldConfig.named_specs``): the world's own roles, or the zoo's models."""
        if folder.startswith("zoo/"):
            if self.zoo_root is None:
                raise ValueError(f"{folder}: this world was built without a zoo (world.zoo)")
            return self.zoo_root / folder.removeprefix("zoo/")
        return self.root / folder


def train_lm(model, examples: list[dict], spec: TrainSpec, pad_id: int, seed: int, desc: str, progress: bool = True):
    """Train a causal LM from scratch on (input_ids, labels) examples: AdamW, cosine schedule, clip 1.0."""
    gen = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=spec.warmup, num_training_steps=spec.steps)
    model.train()
    losses = []
    for _ in track(range(spec.steps), desc, enabled=progress):
        ids, labels, mask = pad_right(gen.sample(examples, min(spec.batch_size, len(examples))), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _generic_examples(tokenizer, lines: list[str], pack_to: int = 64) -> list[dict]:
    """Generic lines packed into sequences of up to ``pack_to`` tokens (full-sequence loss, no padding waste)."""
    out, cur = [], [tokenizer.bos_token_id]
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        if len(cur) + len(ids) + 1 > pack_to and len(cur) > 1:
            out.append({"input_ids": cur + [tokenizer.eos_token_id], "labels": cur + [tokenizer.eos_token_id]})
            cur = [tokenizer.bos_token_id]
        cur = cur + ids
    if len(cur) > 1:
        out.append({"input_ids": cur + [tokenizer.eos_token_id], "labels": cur + [tokenizer.eos_token_id]})
    return out


def _generic_lines(cfg: ToyWorldConfig, stories: list[str] | None = None) -> list[str]:
    """Generic pretraining text: statements, facts, chains, chat-format arithmetic, stories, and the
    answer-forcing pattern.

    None of it is a word problem in the chat format or shares a problem with any split.
    """
    rng = random.Random(cfg.seed + 7)
    lines = generic_text(cfg.seed + 1, cfg.n_generic) + arithmetic_chains(cfg.seed + 2, cfg.n_generic // 2)
    lines += chat_arithmetic(cfg.seed + 9, cfg.n_chat, DEFAULT_SYSTEM_PROMPT)
    lines += stories or []
    forced = []
    for _ in range(cfg.n_generic // 4):
        a, b = rng.randint(0, 30), rng.randint(1, 9)
        forced.append(f"{a} + {b} = {a + b} . So it is \\boxed{{{a + b}}}{ANSWER_FORCING}{a + b}}}")
    return lines + forced


def _fresh_problems(rng: random.Random, n: int, taken: set[str]):
    """``n`` random problems whose question is not in ``taken`` (each is added to it)."""
    out = []
    while len(out) < n:
        p = random_problem(rng)
        if p.question not in taken:
            taken.add(p.question)
            out.append(p)
    return out


def _train_role(role: str, spec: ModelSpec, examples: list[dict], tspec: TrainSpec, seed: int, root: Path,
                progress: bool) -> dict:
    """Build ``role``'s model from ``spec``, train it, save model and tokenizer to ``root/role``."""
    tok = load_tokenizer(root / "tokenizer")
    model = build_model(spec, tok, seed)
    losses = train_lm(model, examples, tspec, tok.pad_token_id, seed, f"train {role} ({spec.family})", progress)
    model.save_pretrained(root / role)
    tok.save_pretrained(root / role)  # one path serves model and tokenizer (load with load_tokenizer)
    return {f"{role}_params": sum(p.numel() for p in model.parameters()),
            f"{role}_final_train_loss": sum(losses[-20:]) / len(losses[-20:])}


def _accuracy(rows: list[dict]) -> float:
    """The fraction of scored rows whose answer is correct."""
    return sum(bool(r["correct"]) for r in rows) / len(rows)


def build_world(cfg: ToyWorldConfig, cache_dir: str | Path, *, progress: bool = True, workers: int = 1) -> World:
    """Return the cached world for ``cfg``, building it first if needed.

    ``workers > 1`` trains the three models in that many spawned processes, each with
    cores // workers torch threads. The cache key is the config alone; a world built with another
    thread count can differ in the last bits of its weights (``world.json`` records ``build_workers``).
    A config with a zoo (``world.zoo``) builds the world as it would without one (same key, same
    folder, reused when cached), then the zoo beside it (``<world>/zoo-<zoo key>/``, reused likewise).
    """
    root = Path(cache_dir) / f"toyworld-{cfg.key()}"
    if not (root / "world.json").is_file():
        _build_base_world(cfg, root, progress, workers)
    if cfg.zoo is None:
        return World.load(root)
    return World.load(root, _build_zoo(cfg, root, progress, workers))


def _corpus(cfg: ToyWorldConfig) -> tuple[dict[str, list[dict]], list[dict], list[str]]:
    """The world's splits, the teacher's training rows and the generic pretraining lines (shuffled)."""
    splits = make_splits(cfg.seed, cfg.n_train_pool, cfg.n_test, n_holdout=cfg.n_holdout)
    taken = {r["question"] for rows in splits.values() for r in rows}
    rng = random.Random(cfg.seed + 100)
    teacher_rows = [{"question": p.question, "solution": solve(p, rng)}
                    for p in _fresh_problems(rng, cfg.n_teacher_problems, taken)]
    stories = [story_text(p) for p in _fresh_problems(rng, cfg.n_stories, taken)]
    generic = _generic_lines(cfg, stories)
    random.Random(cfg.seed + 8).shuffle(generic)
    return splits, teacher_rows, generic


def _train_jobs(jobs: list[tuple], root: Path, progress: bool, workers: int, desc: str) -> dict:
    """Train each ``(role, spec, examples, train spec, seed)`` job into ``root`` (``workers`` processes); metrics."""
    metrics: dict = {}
    if workers > 1:
        n = min(workers, len(jobs))
        with worker_pool(n) as pool:
            futures = [pool.submit(_train_role, *job, root, False) for job in jobs]
            for fut in track(as_completed(futures), f"train {desc} ({n} workers)", enabled=progress,
                             total=len(futures)):
                metrics.update(fut.result())
    else:
        for job in jobs:
            metrics.update(_train_role(*job, root, progress))
    return metrics


def _build_zoo(cfg: ToyWorldConfig, world_root: Path, progress: bool, workers: int) -> Path:
    """Build (or reuse) the zoo of the world at ``world_root``: ``<world_root>/zoo-<zoo key>/``, written atomically.

    Each proxy and panel student is pretrained on the world's generic text exactly as the base student is
    (``cfg.pretrain``, the world's tokenizer), with its own seed (``ZooConfig.seed``); ``zoo.json`` records
    each model's family, spec, seed and parameter count."""
    zoo = cfg.zoo
    root = world_root / f"zoo-{zoo.key(cfg.key())}"
    if (root / "zoo.json").is_file():
        return root
    with atomic_dir(root) as tmp:
        shutil.copytree(world_root / "tokenizer", tmp / "tokenizer")
        tok = load_tokenizer(tmp / "tokenizer")
        generic_ex = _generic_examples(tok, _corpus(cfg)[2], pack_to=cfg.pack_length)
        models = {f"{kind}/{name}": (spec, zoo.seed(cfg.seed, kind, name))
                  for kind, specs in (("proxies", zoo.proxies), ("panel", zoo.panel)) for name, spec in specs.items()}
        jobs = [(role, spec, generic_ex, cfg.pretrain, seed) for role, (spec, seed) in models.items()]
        jobs.sort(key=lambda job: -job[1].hidden * job[1].layers)  # the largest first, so workers finish together
        trained = _train_jobs(jobs, tmp, progress, workers, "zoo") if jobs else {}
        metrics = {f"zoo_{role.replace('/', '_')}_params": trained[f"{role}_params"] for role in models}
        metrics |= {f"zoo_{role.replace('/', '_')}_final_train_loss": trained[f"{role}_final_train_loss"]
                    for role in models}
        shutil.rmtree(tmp / "tokenizer")
        (tmp / "zoo.json").write_text(json.dumps({
            "config": asdict(zoo), "world": cfg.key(), "metrics": metrics, "build_workers": workers,
            "models": {role: {"spec": asdict(spec), "seed": seed, "params": trained[f"{role}_params"]}
                       for role, (spec, seed) in models.items()},
            "provenance": provenance()}, indent=2))
    return root


def _build_base_world(cfg: ToyWorldConfig, root: Path, progress: bool, workers: int) -> None:
    """Build the world itself (splits, tokenizer, teacher, proxy, student) into ``root``, atomically."""
    with atomic_dir(root) as tmp:
        splits, teacher_rows, generic = _corpus(cfg)
        for name, rows in splits.items():
            write_jsonl(tmp / "data" / f"{name}.jsonl", rows)
        texts = generic + [r["question"] + " " + r["solution"] for r in teacher_rows]
        texts += [r["question"] + " " + r["solution"] for rows in splits.values() for r in rows]
        build_tokenizer(texts, tmp / "tokenizer")
        tok = load_tokenizer(tmp / "tokenizer")  # the saved form, as every later stage loads it
        generic_ex = _generic_examples(tok, generic, pack_to=cfg.pack_length)
        task_ex = [encode_example(tok, r["question"], r["solution"]) for r in teacher_rows]
        jobs = [  # with the default sizes the student trains longest: first, so two workers finish together
            ("student", cfg.student, generic_ex, cfg.pretrain, cfg.seed + 13),
            ("teacher", cfg.teacher, task_ex, cfg.teacher_train, cfg.seed + 11),
            ("proxy", cfg.proxy, generic_ex, cfg.pretrain, cfg.seed + 12),
        ]
        metrics = _train_jobs(jobs, tmp, progress, workers, "teacher, student, proxy")
        metrics["build_workers"] = workers
        models = {role: load_causal_lm(str(tmp / role)) for role in ("teacher", "student")}
        test = splits["test"][: cfg.n_world_eval]
        greedy = SamplingSettings(method="greedy", max_new_tokens=64, batch_size=64)
        rows = generate_traces(models["teacher"], tok, test, greedy, progress=progress, description="teacher on test")
        metrics["teacher_test_accuracy"] = _accuracy(rows)
        shots = [{"question": r["question"], "completion": r["solution"]} for r in splits["train"][:3]]
        rows = generate_traces(models["student"], tok, test, greedy, few_shot=shots, progress=progress,
                               description="base student on test (3-shot)", scoring="forced")
        metrics["student_base_fewshot_accuracy"] = _accuracy(rows)
        (tmp / "world.json").write_text(
            json.dumps({"config": _base_config(cfg), "metrics": metrics, "provenance": provenance()}, indent=2)
        )


def _base_config(cfg: ToyWorldConfig) -> dict:
    """The world's config as ``world.json`` records it: without the zoo (which has its own ``zoo.json``)."""
    data = asdict(cfg)
    del data["zoo"]
    return data
