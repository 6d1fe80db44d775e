"""The experiment: a resumable sweep over methods and their parameters.

Stages, in order: toy world (or real models and data), holdout traces, proxy gradient, then for each
point (method, parameter, seed): traces on train, distillation, student evaluation, teacher
evaluation. Every stage writes one artifact atomically and is skipped when that artifact exists, so a
run killed at any moment (SIGKILL included) and started again with the same command redoes no
finished stage, loses nothing and never reads a half-written file.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import dump_yaml
from .distill import DistillConfig
from ..io_utils import atomic_dir, provenance, write_json_atomic, write_text_atomic
from ..progress import track
from ..settings import SamplingSettings
from ..toyworld.build import ToyWorldConfig

METHODS = ("greedy", "temperature", "antidistill", "permutation")


@dataclass
class SweepConfig:
    name: str = "demo"
    runs_dir: str = "runs"
    cache_dir: str = ".cache/antidistill"
    # data and models: "toy" builds the offline toy world; otherwise gsm8k | math | mmlu with HF model paths
    dataset: str = "toy"
    data_path: str | None = None
    teacher: str | None = None
    proxy: str | None = None
    student: str | None = None
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    limit_train: int | None = None
    limit_test: int | None = None
    # the sweep
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.3, 1.6])
    ad_lambdas: list[float] = field(default_factory=lambda: [0.004, 0.007, 0.01, 0.013])
    perm_lambdas: list[float] = field(default_factory=lambda: [0.007, 0.013])
    include_greedy: bool = True
    ad_tau: float = 0.9
    eps: float = 1e-2
    difference: str = "central"
    top_p: float = 0.95
    max_new_tokens: int = 80
    gen_batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    distill: DistillConfig = field(default_factory=DistillConfig)
    n_eval_traces: int = 100  # clean holdout traces for the student's loss-dynamics record (Fig. 5)
    # sweep points run in this many processes at once, each with cores // workers torch threads. On a
    # CPU the toy models are too small to keep two cores busy from one process, so 2 workers on 2 cores
    # finish the points sooner. Results depend on the seeds, not on the worker that ran a point.
    workers: int = 1

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain directory name, got name={self.name!r}")
        if self.dataset != "toy":
            from .data import _ROW

            if self.dataset not in _ROW:
                raise ValueError(f"dataset must be 'toy' or one of {sorted(_ROW)}, got dataset={self.dataset!r}")
            missing = [r for r in ("teacher", "proxy", "student") if getattr(self, r) is None]
            if missing:
                raise ValueError(f"dataset={self.dataset!r} needs model paths for {missing}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer ≥ 1, got workers={self.workers!r}")
        for t in self.temperatures:
            SamplingSettings(method="temperature", tau=t)
        for lam in self.ad_lambdas + self.perm_lambdas:
            SamplingSettings(method="antidistill", lam=lam, eps=self.eps, tau=self.ad_tau, difference=self.difference)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def points(self) -> list[tuple[str, float, int]]:
        """(method, parameter, seed): the parameter is τ for temperature and λ otherwise."""
        pts = []
        for s in self.seeds:
            if self.include_greedy:
                pts.append(("greedy", 0.0, s))
            pts += [("temperature", t, s) for t in self.temperatures]
            pts += [("antidistill", lam, s) for lam in self.ad_lambdas]
            pts += [("permutation", lam, s) for lam in self.perm_lambdas]
        return pts

    def settings_for(self, method: str, param: float, seed: int) -> SamplingSettings:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        common = dict(max_new_tokens=self.max_new_tokens, batch_size=self.gen_batch_size, seed=seed,
                      eps=self.eps, difference=self.difference, top_p=self.top_p)
        if method == "greedy":
            return SamplingSettings(method="greedy", **common)
        if method == "temperature":
            return SamplingSettings(method="temperature", tau=param, **common)
        return SamplingSettings(method=method, tau=self.ad_tau, lam=param, **common)


def point_name(method: str, param: float, seed: int) -> str:
    return f"{method}_{param:g}_s{seed}"


def _point_line(i: int, n: int, pt: tuple, row: dict, seconds: float) -> str:
    return (f"[{i}/{n}] {point_name(*pt)}: teacher {row['teacher_acc']:.2f}, student {row['student_acc']:.2f} "
            f"({seconds:.1f} s)")


class Run:
    """Loads models and data once; runs each stage only if its artifact is missing."""

    def __init__(self, cfg: SweepConfig, progress: bool = True, *, worker: bool = False):
        """``worker=True``: a helper process of a parallel sweep; the parent owns the run directory
        (config file, stale-temporary cleanup) and has already built the world."""
        self.cfg, self.progress = cfg, progress
        self.dir = cfg.run_dir
        self._holdout: list[dict] | None = None
        self._check_config(write=False)
        self._load_world()  # every model and split loads and validates before anything is written
        if not worker:
            self._check_config(write=True)
            self._remove_stale_temporaries()

    # --- setup ---------------------------------------------------------------------------
    def _check_config(self, write: bool) -> None:
        text = dump_yaml(self.cfg)
        path = self.dir / "config.yaml"
        if path.is_file() and path.read_text() != text:
            raise ValueError(
                f"{path} holds a different config: resume with the same settings, or choose another name"
            )
        if write and not path.is_file():
            write_text_atomic(path, text)

    def _remove_stale_temporaries(self) -> None:
        """Delete ``.*.tmp`` files and folders a killed run left behind (never read: the rename never happened).

        A run directory has one writer; do not run the same sweep twice at once.
        """
        for p in sorted(self.dir.rglob(".*.tmp"), key=lambda q: len(q.parts), reverse=True):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

    def _load_world(self) -> None:
        from ..proxy import load_causal_lm
        from ..tokenizers import check_same_tokenizer, check_vocab_sizes, load_tokenizer

        cfg = self.cfg
        if cfg.dataset == "toy":
            from ..toyworld.build import build_world

            world = build_world(cfg.world, cfg.cache_dir, progress=self.progress, workers=cfg.workers)
            self.world_metrics = world.metrics
            self.splits = {s: world.split(s) for s in ("train", "holdout", "test")}
            paths = {r: str(world.model_path(r)) for r in ("teacher", "proxy", "student")}
            if cfg.limit_train:  # real datasets take the limits in load_dataset_splits
                self.splits["train"] = self.splits["train"][: cfg.limit_train]
                self.splits["holdout"] = self.splits["holdout"][: max(1, cfg.limit_train * 3 // 7)]
            if cfg.limit_test:
                self.splits["test"] = self.splits["test"][: cfg.limit_test]
        else:
            from .data import load_dataset_splits

            self.world_metrics = {}
            self.splits = load_dataset_splits(cfg.dataset, cfg.data_path, seed=cfg.world.seed,
                                              limit_train=cfg.limit_train, limit_test=cfg.limit_test)
            paths = {"teacher": cfg.teacher, "proxy": cfg.proxy, "student": cfg.student}
        for name, p in paths.items():
            if not Path(p).exists() and (cfg.dataset == "toy" or p.startswith((".", "/"))):
                raise ValueError(f"{name} model path {p!r} does not exist")
        self.paths = paths
        self.tok = {r: load_tokenizer(p) for r, p in paths.items()}
        self.teacher = load_causal_lm(paths["teacher"])
        self.proxy = load_causal_lm(paths["proxy"])
        check_same_tokenizer(self.tok["teacher"], self.tok["proxy"])
        check_vocab_sizes(self.teacher, self.proxy)

    # --- stages --------------------------------------------------------------------------
    def holdout_traces(self) -> list[dict]:
        """Teacher greedy traces on holdout: generated once, then read once per Run."""
        from .data import read_jsonl, write_jsonl
        from .generation import generate_traces

        if self._holdout is None:
            path = self.dir / "holdout_traces.jsonl"
            if not path.is_file():
                s = self.cfg.settings_for("greedy", 0.0, 0)
                rows = generate_traces(self.teacher, self.tok["teacher"], self.splits["holdout"], s,
                                       progress=self.progress, description="teacher traces on holdout")
                write_jsonl(path, rows)
            self._holdout = read_jsonl(path)
        return self._holdout

    def gradient_path(self) -> Path:
        from ..gradient import compute_proxy_gradient, save_gradient

        path = self.dir / "proxy_grad.safetensors"
        if not path.is_file():
            traces = self.holdout_traces()
            result = compute_proxy_gradient(self.proxy, self.tok["proxy"], traces, progress=self.progress)
            save_gradient(path, result, extra={"run": self.cfg.name})
        return path

    def point(self, method: str, param: float, seed: int) -> dict:
        """Run (or reuse) every stage of one sweep point; returns its result row."""
        from .data import read_jsonl, write_jsonl
        from .generation import build_processor, generate_traces

        d = self.dir / "points" / point_name(method, param, seed)
        result_path = d / "result.json"
        done = self._finished_row(method, param, seed)
        if done is not None:
            return done
        settings = self.cfg.settings_for(method, param, seed)
        proc = None
        if settings.uses_proxy:
            proc = build_processor(settings, self.proxy, self.gradient_path(), self.tok["teacher"], self.tok["proxy"])
        label = f"{method} {param:g} seed {seed}"
        traces_path = d / "traces.jsonl"
        if not traces_path.is_file():
            rows = generate_traces(self.teacher, self.tok["teacher"], self.splits["train"], settings, processor=proc,
                                   progress=self.progress, description=f"traces [{label}]")
            write_jsonl(traces_path, rows)
        teacher_path = d / "teacher_test.jsonl"
        if not teacher_path.is_file():
            rows = generate_traces(self.teacher, self.tok["teacher"], self.splits["test"], settings, processor=proc,
                                   progress=self.progress, description=f"teacher on test [{label}]")
            write_jsonl(teacher_path, rows)
        student_dir = d / "student"
        history_path = d / "history.json"
        if not (student_dir / "config.json").is_file() or not history_path.is_file():
            self._distill(read_jsonl(traces_path), seed, student_dir, history_path)
        student_path = d / "student_test.jsonl"
        if not student_path.is_file():
            from ..proxy import load_causal_lm

            student = load_causal_lm(str(student_dir))
            s = self.cfg.settings_for("greedy", 0.0, seed)
            rows = generate_traces(student, self.tok["student"], self.splits["test"], s, progress=self.progress,
                                   description=f"student on test [{label}]")
            write_jsonl(student_path, rows)
        row = self._result_row(method, param, seed, settings, d)
        write_json_atomic(result_path, row)
        return row

    def _finished_row(self, method: str, param: float, seed: int) -> dict | None:
        """The point's result row if its last stage has finished, else None."""
        path = self.dir / "points" / point_name(method, param, seed) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _distill(self, traces, seed, student_dir: Path, history_path: Path) -> None:
        import torch

        from .distill import distill
        from ..proxy import load_causal_lm

        torch.manual_seed(seed)
        base = load_causal_lm(self.paths["student"])
        holdout = [{"question": r["question"], "completion": r["completion"]}
                   for r in self.holdout_traces()[: self.cfg.n_eval_traces]]
        with atomic_dir(student_dir) as tmp:
            model, history = distill(base, self.tok["student"], traces, self.cfg.distill, output_dir=tmp / "_trainer",
                                     eval_traces=holdout, seed=seed, progress=False)
            shutil.rmtree(tmp / "_trainer", ignore_errors=True)
            model.save_pretrained(tmp)
        write_json_atomic(history_path, history)

    def _result_row(self, method, param, seed, settings, d: Path) -> dict:
        from .data import read_jsonl
        from .evaluate import accuracy_summary, mean_completion_nll
        from ..proxy import load_causal_lm

        teacher = accuracy_summary(read_jsonl(d / "teacher_test.jsonl"))
        student = accuracy_summary(read_jsonl(d / "student_test.jsonl"))
        traces = read_jsonl(d / "traces.jsonl")
        model = load_causal_lm(str(d / "student"))
        nll = mean_completion_nll(model, self.tok["student"], self.splits["test"])
        return {
            "method": method, "param": param, "seed": seed,
            "teacher_acc": teacher["accuracy"], "teacher_ci_low": teacher["ci_low"], "teacher_ci_high": teacher["ci_high"],
            "student_acc": student["accuracy"], "student_ci_low": student["ci_low"], "student_ci_high": student["ci_high"],
            "n_test": student["n"], "trace_acc": accuracy_summary(traces)["accuracy"], "n_traces": len(traces),
            "student_test_nll": nll, "settings": json.dumps(asdict(settings)),
        }

    def run(self) -> Path:
        """All stages, then the results table and the report."""
        from .report import write_report

        self.gradient_path()
        self.holdout_traces()
        points = self.cfg.points()
        if self.cfg.workers > 1:
            rows = self._run_points_parallel(points)
        else:
            rows = []
            for i, pt in enumerate(points, 1):
                t0 = time.perf_counter()
                rows.append(self.point(*pt))
                if self.progress:
                    print(_point_line(i, len(points), pt, rows[-1], time.perf_counter() - t0), flush=True)
        table = self.write_results(rows)
        write_report(self, table)
        return self.dir

    def _run_points_parallel(self, points: list[tuple[str, float, int]]) -> list[dict]:
        """Run the points in ``cfg.workers`` spawned processes; rows come back in ``points`` order.

        Each point's stages are atomic, so this is as resumable as the serial loop. The workers die
        with this process (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no writer behind.
        """
        from concurrent.futures import as_completed

        from ..io_utils import distributed_state, worker_pool

        if distributed_state().num_processes > 1:
            raise ValueError("workers > 1 cannot be combined with accelerate launch; use one or the other")
        rows = {pt: row for pt in points if (row := self._finished_row(*pt)) is not None}
        todo = [pt for pt in points if pt not in rows]
        if todo:
            n = min(self.cfg.workers, len(todo))
            with worker_pool(n) as pool:
                futures = {pool.submit(_run_point_in_worker, self.cfg, pt): pt for pt in todo}
                try:
                    for fut in track(as_completed(futures), f"sweep points ({n} workers)", enabled=self.progress,
                                     total=len(futures)):
                        pt = futures[fut]
                        rows[pt], seconds = fut.result()
                        if self.progress:
                            print(_point_line(len(rows), len(points), pt, rows[pt], seconds), flush=True)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        return [rows[pt] for pt in points]

    def write_results(self, rows: list[dict]):
        import pandas as pd

        from ..io_utils import atomic_path

        df = pd.DataFrame(rows)
        df["config"] = json.dumps(asdict(self.cfg), default=str)
        for k, v in provenance().items():
            df[k] = v
        with atomic_path(self.dir / "results.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        return df


# --- parallel sweep workers: one Run per worker process, built on its first point ---
_worker_run: Run | None = None


def _run_point_in_worker(cfg: SweepConfig, pt: tuple[str, float, int]) -> tuple[dict, float]:
    global _worker_run
    t0 = time.perf_counter()
    if _worker_run is None:
        _worker_run = Run(cfg, progress=False, worker=True)
    row = _worker_run.point(*pt)
    return row, time.perf_counter() - t0
