"""Build (or reuse) the toy world: data splits, tokenizer, and three models trained from scratch.

The world is cached under ``<cache>/toyworld-<hash of its config>/`` and written atomically, so a
second run with the same config reuses it and an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
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

    def __post_init__(self):
        if self.n_holdout is not None and not 0 < self.n_holdout < self.n_train_pool:
            raise ValueError(f"world.n_holdout must be in (0, n_train_pool={self.n_train_pool}), "
                             f"got n_holdout={self.n_holdout}")
        if self.n_world_eval < 1:
            raise ValueError(f"world.n_world_eval must be ≥ 1, got n_world_eval={self.n_world_eval}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass
class World:
    root: Path
    config: dict
    metrics: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer"

    def model_path(self, role: str) -> Path:
        return self.root / role

    def split(self, name: str) -> list[dict]:
        return read_jsonl(self.root / "data" / f"{name}.jsonl")

    @classmethod
    def load(cls, root: Path) -> World:
        info = json.loads((root / "world.json").read_text())
        return cls(root=root, config=info["config"], metrics=info["metrics"])


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
    """
    root = Path(cache_dir) / f"toyworld-{cfg.key()}"
    if (root / "world.json").is_file():
        return World.load(root)
    with atomic_dir(root) as tmp:
        splits = make_splits(cfg.seed, cfg.n_train_pool, cfg.n_test, n_holdout=cfg.n_holdout)
        for name, rows in splits.items():
            write_jsonl(tmp / "data" / f"{name}.jsonl", rows)
        taken = {r["question"] for rows in splits.values() for r in rows}
        rng = random.Random(cfg.seed + 100)
        teacher_rows = [{"question": p.question, "solution": solve(p, rng)}
                        for p in _fresh_problems(rng, cfg.n_teacher_problems, taken)]
        stories = [story_text(p) for p in _fresh_problems(rng, cfg.n_stories, taken)]
        generic = _generic_lines(cfg, stories)
        random.Random(cfg.seed + 8).shuffle(generic)
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
        metrics: dict = {}
        if workers > 1:
            n = min(workers, len(jobs))
            with worker_pool(n) as pool:
                futures = [pool.submit(_train_role, *job, tmp, False) for job in jobs]
                for fut in track(as_completed(futures), f"train teacher, student, proxy ({n} workers)",
                                 enabled=progress, total=len(futures)):
                    metrics.update(fut.result())
        else:
            for job in jobs:
                metrics.update(_train_role(*job, tmp, progress))
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
            json.dumps({"config": asdict(cfg), "metrics": metrics, "provenance": provenance()}, indent=2)
        )
    return World.load(root)
