"""The experiment: a resumable sweep over methods and their parameters.

Stages, in order: toy world (or real models and data), holdout traces, proxy gradient, then for each
point (method, parameter, seed): traces on train, teacher evaluation, distillation, student
evaluation; then the results table, the finite-difference check and the report. Every stage writes
one artifact atomically and is skipped when that artifact exists (``rundir.stage``), so a run killed
at any moment (SIGKILL included) and started again with the same command redoes no finished stage,
loses nothing and never reads a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from concurrent.futures import as_completed
from pathlib import Path

import pandas as pd
import torch

from ..generation import generate_traces
from ..gradient import compute_proxy_gradient, recorded_grad_norm, save_gradient, save_random_direction
from ..io_utils import atomic_dir, atomic_path, provenance, read_jsonl, write_json_atomic, write_jsonl, write_text_atomic
from ..progress import track
from ..proxy import load_causal_lm
from ..runtime import distributed_state, worker_pool
from ..settings import SamplingSettings
from .arms import ARMS, arm_processor, arm_spec
from .calibration import Design, calibrate, outside_picks
from .distill import distill
from .distiller_stages import DistillerStages, check_distiller_settings, with_distiller
from .evaluate import accuracy_summary, solution_nll
from .fdcheck import eps_from_check, holdout_fd_check
from .gate import gate_on_record, keep_recorded_gate, world_gate
from .materials import load_materials
from .panel_stages import PanelStages
from .report import write_report
from .rundir import RunDir, point_name, stage
from .sweepconfig import SweepConfig, config_text, same_but_distillers

__all__ = ["Run", "SweepConfig"]


def _point_line(i: int, n: int, pt: tuple, row: dict, seconds: float) -> str:
    by = "" if row.get("distiller", "naive") == "naive" else f" [{row['distiller']}]"
    return (f"[{i}/{n}] {point_name(*pt)}{by}: teacher {row['teacher_acc']:.2f}, student {row['student_acc']:.2f} "
            f"({seconds:.1f} s)")


class Run:
    """One sweep: loads models and data once, then runs each stage whose artifact is missing."""

    def __init__(self, cfg: SweepConfig, progress: bool = True, *, worker: bool = False, completer_factory=None):
        """``worker=True``: a helper process of a parallel sweep; the parent owns the run directory
        (config file, stale-temporary cleanup) and has already built the world.

        ``completer_factory`` (``cfg.engine != "hf"``): ``(teacher, proxy, grad, tokenizer, settings, workdir)``
        → a :class:`~antidistill.generation.TextCompleter` that generates each point's teacher
        traces (the apps layer passes vLLM's, ``antidistill.engines.vllm.offline.sweep_completer``).
        """
        if cfg.engine != "hf" and completer_factory is None:
            raise ValueError(f"engine={cfg.engine!r} needs its completer: run the sweep with `antidistill sweep`")
        self.completer_factory = completer_factory
        self.cfg, self.progress = cfg, progress
        self.dir = cfg.run_dir
        self.files = RunDir(self.dir)
        self._holdout: list[dict] | None = None
        self._design: Design | None = None
        self._check_config(write=False)
        self.worker = worker
        self.gate_record = None if worker else gate_on_record(cfg)  # before the world is built; workers never gate
        # every model and split loads and validates before anything is written
        self.materials = load_materials(
            cfg.dataset, world=cfg.world, cache_dir=cfg.cache_dir, data_path=cfg.data_path,
            models={r: getattr(cfg, r) for r in ("teacher", "proxy", "student")}, limit_train=cfg.limit_train,
            limit_test=cfg.limit_test, workers=cfg.workers, progress=progress, tokenizer_dirs=cfg.tokenizer_dirs)
        self.splits, self.paths, self.tok = self.materials.splits, self.materials.paths, self.materials.tokenizers
        self.teacher, self.proxy = self.materials.teacher, self.materials.proxy
        self.adaptive = DistillerStages(self)  # the distillers other than the naive one
        self.panel = PanelStages(self)  # the zoo's proxies and the panel's students (issue 16)
        if not worker:
            self._check_config(write=True)
            self.files.remove_stale_temporaries()  # a run directory has one writer
            if self.materials.world_metrics:
                stage(self.files.world, lambda p: write_json_atomic(p, self.materials.world_metrics))

    # --- setup ---------------------------------------------------------------------------
    def _check_config(self, write: bool) -> None:
        text = config_text(self.cfg)
        path = self.files.config
        if path.is_file() and path.read_text() != text:
            if not same_but_distillers(path.read_text(), text):
                raise ValueError(f"{path} holds a different config: resume with the same settings (distillers may come "
                                 f"or go, distill_at and replicate may change; a distiller keeps its settings), or "
                                 f"choose another name")
        check_distiller_settings(self.files, self.cfg.distillers, write=False)
        if write:  # a run that gains or drops distillers keeps its other stages; the new rows are added
            check_distiller_settings(self.files, self.cfg.distillers, write=True)
            if not path.is_file() or path.read_text() != text:
                write_text_atomic(path, text)

    # --- stages --------------------------------------------------------------------------
    def _traces(self, model, tokenizer, split: str, settings: SamplingSettings, description: str, **kw):
        """A stage maker: generate traces on ``split`` and write them as JSONL."""
        return lambda path: write_jsonl(path, generate_traces(model, tokenizer, self.splits[split], settings,
                                                               progress=self.progress, description=description,
                                                               **kw))

    def holdout_traces(self) -> list[dict]:
        """Teacher greedy traces on holdout: generated once, then read once per Run."""
        if self._holdout is None:
            greedy = self.cfg.settings_for("greedy", 0.0, 0)
            path = stage(self.files.holdout_traces, self._traces(self.teacher, self.tok["teacher"], "holdout", greedy,
                                                                 "teacher traces on holdout"))
            self._holdout = read_jsonl(path)
        return self._holdout

    def gradient_path(self) -> Path:
        def make(path):
            # on the teacher's token ids (its tokenizer and chat template): the ids Δ̂ is evaluated on
            result = compute_proxy_gradient(self.proxy, self.tok["teacher"], self.holdout_traces(), progress=self.progress)
            save_gradient(path, result, extra={"run": self.cfg.name})
        return stage(self.files.gradient, make)

    def whitebox_gradient_path(self) -> Path:
        """g over the *base student's* weights on the same holdout traces (the white-box arms)."""
        def make(path):
            result = compute_proxy_gradient(load_causal_lm(self.paths["student"]), self.tok["teacher"],
                                            self.holdout_traces(), progress=self.progress)
            save_gradient(path, result, extra={"run": self.cfg.name, "proxy": "base student (white-box)"})
        return stage(self.files.whitebox_gradient, make)

    def random_direction_path(self) -> Path:
        """g's norm-matched random stand-in (``random_direction`` arm), seeded with the world's seed."""
        return stage(self.files.random_direction, lambda p: save_random_direction(p, self.gradient_path(), self.cfg.world.seed))

    def processor_for(self, method: str, settings: SamplingSettings, param: float | None = None):
        """The logits processor of arm ``method`` at a point with parameter ``param`` (None if it has none)."""
        arm = arm_spec(method) if "@" in method else ARMS.get(method)
        if arm is None or not (settings.uses_proxy or arm.param == "gamma"):
            return None
        if arm.proxy == "student":
            proxy, grad, ptok = load_causal_lm(self.paths["student"]), self.whitebox_gradient_path(), self.tok["student"]
        elif arm.proxy == "proxy":  # with g or its random stand-in (a γ arm, proxy-logit mixing, ignores it)
            proxy, ptok, grad = self.proxy, self.tok["proxy"], (self.random_direction_path() if arm.direction == "random" else self.gradient_path())
        else:  # a named zoo proxy or panel student: the toy world's one tokenizer
            proxy, grad, ptok = self.panel.proxy_of(method)
        return arm_processor(arm, settings, proxy, grad, self.tok["teacher"], ptok, param=param,
                             teacher_vocab_size=self.teacher.get_output_embeddings().weight.shape[0])

    def point(self, method: str, param: float, seed: int) -> dict:
        """Run (or reuse) every stage of one sweep point; returns its result row (the naive distiller's)."""
        files = self.files.point(method, param, seed)
        if files.result.is_file():
            return json.loads(files.result.read_text())
        settings = self.teacher_stages(method, param, seed)
        label = f"{method} {param:g} seed {seed}"
        stage(files.student, lambda path: self._distill(read_jsonl(files.traces), seed, path))
        student = load_causal_lm(str(files.student))
        greedy = self.cfg.settings_for("greedy", 0.0, seed)
        stage(files.student_test, self._traces(student, self.tok["student"], "test", greedy,
                                               f"student on test [{label}]", scoring="forced"))
        row = self._result_row(method, param, seed, settings, files, student)
        write_json_atomic(files.result, row)
        return row

    def point_rows(self, method: str, param: float, seed: int, gate_only: bool = False) -> list[dict]:
        """One point's rows, one per configured distiller (in config order), each with its ``distiller``; then one
        per further panel student; each labelled with its proxy and student (``PanelStages.rows``).
        ``gate_only``: the base student's naive row alone (what the gate reads; the rest waits for it), as a
        replicate seed's point always gives."""
        if gate_only or self.cfg.is_replicate(seed):
            return [with_distiller(self.point(method, param, seed), "naive") | self.panel.labels(method, self.cfg.panel()[0])]
        rows = [with_distiller(self.point(method, param, seed), d.kind) if d.kind == "naive"
                else self.adaptive.row(method, param, seed, d) for d in self.adaptive.distillers_at(method, param)]
        return self.panel.rows(method, param, seed, rows)

    def point_done(self, method: str, param: float, seed: int, gate_only: bool = False) -> bool:
        """Whether every row :meth:`point_rows` gives for this point is written."""
        files = self.files.point(method, param, seed)
        if gate_only or self.cfg.is_replicate(seed):
            return files.result.is_file()
        return all((files.result if d.kind == "naive" else files.distiller(d.kind).result).is_file()
                   for d in self.adaptive.distillers_at(method, param)) and all(files.panel(s).result.is_file() for s in self.cfg.panel()[1:])

    def teacher_stages(self, method: str, param: float, seed: int) -> SamplingSettings:
        """The point's teacher traces on train and on test (made once, whoever distils them); its settings."""
        files = self.files.point(method, param, seed)
        settings = self.cfg.settings_for(method, param, seed, tau=self.design.base_tau if self.design else None)
        label = f"{method} {param:g} seed {seed}"
        teacher, tok = self.teacher, self.tok["teacher"]
        engine = self.completer_factory is not None and not (
            files.traces.exists() and (files.teacher_test.exists() or self.cfg.teacher_eval == "traces"))
        # another engine, if any, generates the teacher's traces (built only if one is missing); students stay HF
        proc = self.processor_for(method, settings, param) if self.completer_factory is None else None
        if engine:
            grad = str(self.gradient_path()) if settings.uses_proxy else None
            teacher = self.completer_factory(self.paths["teacher"], self.paths["proxy"], grad, tok, settings,
                                             files.root / "engine")
        stage(files.traces, self._traces(teacher, tok, "train", settings, f"traces [{label}]", processor=proc))
        if self.cfg.teacher_eval == "test":
            stage(files.teacher_test, self._traces(teacher, tok, "test", settings, f"teacher on test [{label}]",
                                                   processor=proc))
        if engine:
            teacher.close()
        return settings

    def _distill(self, traces, seed, student_dir: Path, *, start: str | None = None, cfg=None, weights=None,
                 eval_traces: list[dict] | None = None) -> None:
        """Distil the base student (or the model at ``start``) on ``traces`` into ``student_dir``, with its loss
        history inside; ``cfg`` (default: the sweep's ``distill``), ``weights`` and ``eval_traces`` (default: the
        first ``n_eval_traces`` holdout traces) as :func:`~antidistill.experiment.distill.distill` takes them.

        Model and ``history.json`` land in one rename, so a kill at any moment leaves both or neither.
        """
        torch.manual_seed(seed)
        base = load_causal_lm(start or self.paths["student"])
        holdout = eval_traces if eval_traces is not None else [
            {"question": r["question"], "completion": r["completion"]}
            for r in self.holdout_traces()[: self.cfg.n_eval_traces]]
        with atomic_dir(student_dir) as tmp:
            model, history = distill(base, self.tok["student"], traces, cfg or self.cfg.distill,
                                     output_dir=tmp / "_trainer", eval_traces=holdout or None, seed=seed,
                                     progress=False, weights=weights)
            shutil.rmtree(tmp / "_trainer", ignore_errors=True)
            model.save_pretrained(tmp)
            (tmp / "history.json").write_text(json.dumps(history))

    def _result_row(self, method, param, seed, settings, files, student) -> dict:
        traces = read_jsonl(files.traces)
        teacher_rows = traces if self.cfg.teacher_eval == "traces" else read_jsonl(files.teacher_test)
        teacher = accuracy_summary(teacher_rows)
        student_acc = accuracy_summary(read_jsonl(files.student_test))
        nll, by_class = solution_nll(student, self.tok["student"], self.splits["test"])
        target = self.design.targets.get((method, param)) if self.design else None
        return {
            "method": method, "param": param, "seed": seed, "target": float("nan") if target is None else target,
            "tau": settings.tau, "teacher_eval": self.cfg.teacher_eval, "n_teacher": teacher["n"],
            "teacher_acc": teacher["accuracy"], "teacher_ci_low": teacher["ci_low"], "teacher_ci_high": teacher["ci_high"],
            "student_acc": student_acc["accuracy"], "student_ci_low": student_acc["ci_low"],
            "student_ci_high": student_acc["ci_high"], "n_test": student_acc["n"],
            "trace_acc": accuracy_summary(traces)["accuracy"], "n_traces": len(traces),
            "student_test_nll": nll, **{f"student_nll_{k}": v for k, v in by_class.items()},
            "teacher_forced_frac": sum(r.get("answer_source") == "forced" for r in teacher_rows) / len(teacher_rows),
            "scoring": "delivered", "world": Path(self.paths["teacher"]).parent.name, "settings": json.dumps(dataclasses.asdict(settings)),
        }

    def fd_check(self) -> Path:
        """Appendix B.1 on this run's proxy and g, at the last 8 tokens of two holdout traces."""
        return stage(self.files.fd_check, lambda path: write_json_atomic(path, holdout_fd_check(
            self.proxy, self.gradient_path(), self.tok["teacher"], self.holdout_traces()[:2], self.files.fd_plot)))

    @property
    def design(self) -> Design | None:
        """A calibrated run's design (chosen values, targets, base τ); None for ``grid: config``."""
        if self.cfg.grid != "calibrated":
            return None
        if self._design is None:
            if not self.files.calibration.is_file():
                raise ValueError("grid='calibrated': the calibration stage has not run (Run.points() runs it)")
            self._design = Design.load(self.files.calibration)
        return self._design

    def points(self) -> list[tuple[str, float, int]]:
        """The sweep's points: from the config, or (``grid="calibrated"``) from this run's calibration stage.

        Greedy and temperature points come first: the gate (``world_gate``) is checked on them."""
        if self.cfg.grid == "config":
            pts = self.cfg.points()
        else:
            path = calibrate(self, self.cfg.calibration, progress=self.progress)
            outside = outside_picks(path)
            if outside:
                warnings.warn(f"calibration targets outside the measured curves, run at the curve's end instead: "
                              f"{'; '.join(outside)} (widen calibration.temperatures or lam_range; {path})",
                              RuntimeWarning, stacklevel=2)
            pts = self.cfg.points(self.design.grid) + self.cfg.replicate.points(self.design.targets)
        return sorted(pts, key=lambda pt: pt[0] not in ("greedy", "temperature"))

    def check_eps(self) -> float:
        """The best ε the FD check found for this run's g (in the proxy's dtype); warns when
        ``sampling.eps`` is more than a factor ``fdcheck.EPS_TOLERANCE`` away from it."""
        dtype = str(next(self.proxy.parameters()).dtype).removeprefix("torch.")
        best, far = eps_from_check(json.loads(self.fd_check().read_text()), dtype, self.cfg.sampling.eps)
        if far:
            norm = recorded_grad_norm(self.gradient_path(), self.proxy)
            warnings.warn(f"sampling.eps={self.cfg.sampling.eps:g} is far from the best ε {best:g} that the FD check "
                          f"found for this g ({dtype}, ‖g‖ = {norm:.3g}; {self.files.fd_check}): "
                          f"consider --set sampling.eps={best:g}", RuntimeWarning, stacklevel=2)
        return best

    def run(self) -> Path:
        """All stages, then the results table and the report. Unless ``gate`` is "skip" the world's gate
        (:meth:`world_gate`) comes first; with ``gate: stop`` a world that fails it ends there (results and report
        of the gate's rows only: no adaptive distiller, panel student or defended arm runs on it)."""
        self.gradient_path()
        self.holdout_traces()
        self.check_eps()
        points = self.points()
        rows = None
        if self.cfg.gate != "skip":
            gate, naive = self.world_gate(points)
            if not gate["passes"]:
                warnings.warn(f"the world fails the gate ({gate['reason']}); {self.files.gate}", RuntimeWarning,
                              stacklevel=2)
                rows = naive if self.cfg.gate == "stop" else None
        if rows is None:
            self.adaptive.prepare(self.cfg.seeds)
            for method in sorted({m for m, _, _ in points}):  # every arm's g, before any worker needs it
                self.panel.gradient_path(method)
                if arm_spec(method).direction == "random":
                    self.random_direction_path()
            rows = self._run_points(points)
        self.write_results(rows)
        self.fd_check()
        write_report(self.dir)
        return self.dir

    def world_gate(self, points: list[tuple[str, float, int]]) -> tuple[dict, list[dict]]:
        """The world's gate (``gate.json``) and the rows it was measured on: the base student's naive rows of the
        greedy and temperature ``points`` at the sweep's own seeds (``gate.world_gate``), or, with ``gate_from``,
        the gate recorded there for this world build and no rows (``gate.keep_recorded_gate``)."""
        if self.worker:
            raise RuntimeError("a sweep's worker process does not gate the world: its parent does")
        if self.gate_record is None:
            first = [pt for pt in points if pt[0] in ("greedy", "temperature") and not self.cfg.is_replicate(pt[2])]
            naive = self._run_points(first, gate_only=True)
            stage(self.files.gate, lambda p: write_json_atomic(p, world_gate(
                pd.DataFrame(naive), self.cfg.gate_min_greedy_student, self.cfg.gate_min_slope)))
            return json.loads(self.files.gate.read_text()), naive
        return keep_recorded_gate(self.files.gate, *self.gate_record), []

    def _run_points(self, points: list[tuple[str, float, int]], gate_only: bool = False) -> list[dict]:
        """Every point's rows (:meth:`point_rows`), serially or in ``cfg.workers`` processes."""
        if self.cfg.workers > 1:
            return self._run_points_parallel(points, gate_only)
        rows = []
        for i, pt in enumerate(points, 1):
            t0 = time.perf_counter()
            point_rows = self.point_rows(*pt, gate_only=gate_only)
            rows += point_rows
            if self.progress:
                for row in point_rows:
                    print(_point_line(i, len(points), pt, row, time.perf_counter() - t0), flush=True)
        return rows

    def _run_points_parallel(self, points: list[tuple[str, float, int]], gate_only: bool = False) -> list[dict]:
        """Run the points in ``cfg.workers`` spawned processes; rows come back in ``points`` order (a point's
        distillers in config order, all in the worker that has the point).

        Each point's stages are atomic, so this is as resumable as the serial loop. The workers die
        with this process (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no writer behind.
        """
        if distributed_state().num_processes > 1:
            raise ValueError("workers > 1 cannot be combined with accelerate launch; use one or the other")
        rows = {}
        for pt in points:
            if self.point_done(*pt, gate_only=gate_only):
                rows[pt] = self.point_rows(*pt, gate_only=gate_only)
        todo = [pt for pt in points if pt not in rows]
        if todo:
            n = min(self.cfg.workers, len(todo))
            with worker_pool(n) as pool:
                futures = {pool.submit(_run_point_in_worker, self.cfg, pt, self.completer_factory, gate_only): pt
                           for pt in todo}
                try:
                    for fut in track(as_completed(futures), f"sweep points ({n} workers)", enabled=self.progress,
                                     total=len(futures)):
                        pt = futures[fut]
                        rows[pt], seconds = fut.result()
                        if self.progress:
                            for row in rows[pt]:
                                print(_point_line(len(rows), len(points), pt, row, seconds), flush=True)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        return [row for pt in points for row in rows[pt]]

    def write_results(self, rows: list[dict]) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        df["config"] = json.dumps(dataclasses.asdict(self.cfg), default=str)
        for k, v in provenance().items():
            df[k] = v
        with atomic_path(self.files.results) as tmp:
            df.to_parquet(tmp, index=False)
        return df


def _run_point_in_worker(cfg: SweepConfig, pt: tuple[str, float, int], completer_factory=None,
                         gate_only: bool = False) -> tuple[list[dict], float]:
    """One point's rows (:meth:`Run.point_rows`) in a pool worker, which loads the run's (cached) world and models."""
    t0 = time.perf_counter()
    rows = Run(cfg, progress=False, worker=True, completer_factory=completer_factory).point_rows(*pt, gate_only=gate_only)
    return rows, time.perf_counter() - t0
