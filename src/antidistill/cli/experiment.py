"""The experiment's commands: generate, gradient, distill, check-fd, sweep, calibrate, demo, build-world, report,
export-world, transfer-score."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..config import load_config
from ..experiment.calibration import calibrate
from ..experiment.campaign import parse_world_seeds, run_worlds
from ..experiment.distill import DistillConfig, distill
from ..experiment.dryrun import dry_run as plan_sweep
from ..experiment.evaluate import accuracy_summary
from ..experiment.fdcheck import fd_check, plot_fd_check
from ..generation import build_processor, generate_traces
from ..experiment.report import write_report
from ..experiment.results_io import export_world
from ..experiment.sweep import Run, SweepConfig
from ..experiment.transfer_score import transfer_score
from ..gradient import compute_proxy_gradient, save_gradient
from ..io_utils import atomic_dir, provenance, read_jsonl, require_keys, write_json_atomic, write_jsonl
from ..prompting import prompt_text
from ..proxy import load_causal_lm
from ..runtime import distributed_state
from ..settings import SamplingSettings
from ..tokenizer_compat import check_compatible_tokenizers, check_vocab_sizes, load_tokenizer
from ..toyworld.build import build_world
from ..experiment.defaults import default_artifacts
from .common import PACKAGE_CONFIGS, fail
from .options import config_options

SAMPLING_OPTIONS = ["method", "lam", "eps", "tau", "difference", "top_p", "max_new_tokens", "batch_size", "seed"]


@config_options(SamplingSettings, SAMPLING_OPTIONS)
def generate(
    teacher: str = typer.Option(..., help="teacher model path"),
    problems: Path = typer.Option(..., help="JSONL of {id, question, answer}"),
    out: Path = typer.Option(..., help="output JSONL: traces, correctness, settings"),
    proxy: Optional[str] = typer.Option(None, help="proxy model path (antidistill, permutation)"),
    grad: Optional[Path] = typer.Option(None, help="proxy gradient .safetensors"),
    limit: Optional[int] = typer.Option(None, help="only the first N problems"),
    config: Optional[Path] = typer.Option(None, help="SamplingSettings YAML"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: key=value"),
    engine: str = typer.Option("hf", help="hf (transformers) | vllm (vLLM's offline engine, docs/vllm.md)"),
    reasoning_only: bool = typer.Option(False, help="antidistill/permutation on the reasoning only: λ switches off "
                                        "once the trace has written its **Final Answer** header (engine hf)"),
    *,
    values: dict[str, Any],
):
    """Generate traces for a set of problems with one sampling method, force answers, and score them."""
    try:
        s = load_config(SamplingSettings, config, list(set_), values)
        if s.uses_proxy and (proxy is None or grad is None):
            raise ValueError(f"method={s.method!r} needs --proxy and --grad")
        if reasoning_only and (not s.uses_proxy or engine != "hf"):
            raise ValueError(f"--reasoning-only needs method antidistill or permutation on engine hf, "
                             f"got method={s.method!r}, engine={engine!r}")
        rows_in = read_jsonl(problems)[:limit]
        if not rows_in:
            raise ValueError(f"{problems}: no problems")
        require_keys(rows_in, problems, ("question", "answer"))
        for i, r in enumerate(rows_in, 1):
            r.setdefault("id", f"row-{i}")
        tok = load_tokenizer(teacher)
        if engine == "vllm":
            from ..engines.vllm import offline  # an optional extra: imported only when asked for

            if s.uses_proxy:
                check_compatible_tokenizers(tok, load_tokenizer(proxy))
            llm = offline.build_offline_llm(teacher, proxy, grad, s, workdir=Path(out).with_suffix(".vllm-model"))
            rows = offline.generate_traces(llm, tok, rows_in, s)
        elif engine == "hf":
            proc = None
            if s.uses_proxy:
                proc = build_processor(s, load_causal_lm(proxy), grad, tok, load_tokenizer(proxy),
                                       reasoning_only=reasoning_only)
            rows = generate_traces(load_causal_lm(teacher), tok, rows_in, s, processor=proc)
        else:
            raise ValueError(f"--engine must be hf or vllm, got {engine!r}")
    except (ValueError, ImportError) as e:
        fail(e)
    state = distributed_state()
    if not state.is_main_process:
        return
    meta = {"settings": dataclasses.asdict(s), "reasoning_only": reasoning_only, "engine": engine, "teacher": teacher, "proxy": proxy, "grad": str(grad) if grad else None,
            "n_processes": state.num_processes, **provenance()}
    write_jsonl(out, [r | {"meta": meta} for r in rows])
    typer.echo(json.dumps({"out": str(out), "n": len(rows), "accuracy": accuracy_summary(rows)["accuracy"]}))


def gradient(
    proxy: str = typer.Option(..., help="proxy model path"),
    traces: Path = typer.Option(..., help="JSONL of teacher traces on holdout: {question, completion}"),
    out: Path = typer.Option(..., help="output .safetensors"),
    teacher: Optional[str] = typer.Option(None, help="the teacher (or its tokenizer folder): g is taken on its token "
                                                     "ids and chat template (default: the proxy's own tokenizer)"),
    batch_size: int = typer.Option(8),
):
    """Compute the proxy gradient g once (eq. 7) and save it as safetensors. Works under `accelerate launch`."""
    try:
        state = distributed_state()  # joins the process group under `accelerate launch`
        rows = read_jsonl(traces)
        require_keys(rows, traces, ("question", "completion"))
        ptok = load_tokenizer(proxy)
        tok = ptok if teacher is None else load_tokenizer(teacher)
        if teacher is not None:
            check_compatible_tokenizers(tok, ptok)
        result = compute_proxy_gradient(load_causal_lm(proxy), tok, rows, batch_size=batch_size)
    except ValueError as e:
        fail(e)
    if state.is_main_process:
        save_gradient(out, result)
        typer.echo(f"saved {out}: loss {result.loss:.4f} over {result.n_tokens} tokens of {result.n_traces} traces, "
                   f"‖g‖ {result.norm:.4g}")


def distill_cmd(
    student: str = typer.Option(..., help="student model path"),
    traces: Path = typer.Option(..., help="JSONL of {question, completion} teacher traces"),
    out: Path = typer.Option(..., help="output model folder"),
    eval_traces: Optional[Path] = typer.Option(None, help="clean holdout traces for the loss-dynamics record"),
    config: Optional[Path] = typer.Option(None, help="DistillConfig YAML"),
    seed: int = typer.Option(0),
    set_: list[str] = typer.Option([], "--set", help="override: key=value"),
):
    """Distil a student on teacher traces (TRL SFTTrainer, LoRA by default). Works under `accelerate launch`."""
    trainer_dir = out.parent / f".{out.name}.trainer"
    try:
        cfg = load_config(DistillConfig, config, list(set_))
        rows = read_jsonl(traces)
        require_keys(rows, traces, ("question", "completion"))
        evals = read_jsonl(eval_traces) if eval_traces else None
        tok = load_tokenizer(student)
        model, history = distill(load_causal_lm(student), tok, rows, cfg, output_dir=trainer_dir,
                                 eval_traces=evals, seed=seed)
    except ValueError as e:
        fail(e)
    if distributed_state().is_main_process:
        shutil.rmtree(trainer_dir, ignore_errors=True)
        with atomic_dir(out) as tmp:  # model, tokenizer and history land in one rename
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "history.json").write_text(json.dumps(history))
        typer.echo(json.dumps({"out": str(out), "steps": max((h["step"] for h in history), default=0)}))


def transfer_score_cmd(
    teacher: str = typer.Option(..., help="the teacher model path: its token ids, chat template and nucleus"),
    proxy: str = typer.Option(..., help="the proxy model path"),
    student: str = typer.Option(..., help="the candidate student model path"),
    traces: Path = typer.Option(..., help="JSONL of the teacher's holdout traces: {question, completion}"),
    proxy_grad: Optional[Path] = typer.Option(None, help="the proxy's g on these traces (default: computed here)"),
    student_grad: Optional[Path] = typer.Option(None, help="the student's own g on these traces (default: computed)"),
    positions: Optional[int] = typer.Option(None, help="score at most N completion positions (traces in order)"),
    eps: float = typer.Option(1e-2, help="ε of the central difference of Δ̂"),
    top_p: float = typer.Option(0.95, help="the teacher's nucleus mass: the tokens compared at each position"),
    seed: int = typer.Option(0, help="seed of the bootstrap over traces"),
    out: Optional[Path] = typer.Option(None, help="write the score and its interval as JSON"),
):
    """How well a proxy's Δ̂ ranks the teacher's likely tokens as a student's own Δ̂ does (Spearman, −1 to 1),
    with a 95% bootstrap interval over traces: choose proxies without distilling anything."""
    try:
        rows = read_jsonl(traces)
        require_keys(rows, traces, ("question", "completion"))
        tok = load_tokenizer(teacher)
        models = {}
        for role, path in (("teacher", teacher), ("proxy", proxy), ("student", student)):
            if role != "teacher":
                check_compatible_tokenizers(tok, load_tokenizer(path))
            models[role] = load_causal_lm(path)
            if role != "teacher":
                check_vocab_sizes(models["teacher"], models[role], len(tok))
        result = transfer_score(models["teacher"], models["proxy"], models["student"], tok, rows,
                                proxy_grad=proxy_grad, student_grad=student_grad, eps=eps, top_p=top_p,
                                max_positions=positions, seed=seed)
    except ValueError as e:
        fail(e)
    typer.echo(result.summary())
    if out is not None:
        write_json_atomic(out, result.as_dict() | {"teacher": teacher, "proxy": proxy, "student": student,
                                                   "traces": str(traces), "proxy_grad": str(proxy_grad or ""),
                                                   "student_grad": str(student_grad or ""), **provenance()})


def check_tokenizers(
    teacher: str = typer.Argument(..., help="the teacher's model or tokenizer folder (or hub name)"),
    proxy: str = typer.Argument(..., help="the proxy's model or tokenizer folder (or hub name)"),
):
    """Check that the proxy reads the teacher's token ids: ordinary ids decode alike, control tokens map by role."""
    try:
        match = check_compatible_tokenizers(load_tokenizer(teacher), load_tokenizer(proxy))
    except ValueError as e:
        fail(e)
    typer.echo(match.summary())


def check_fd(
    proxy: Optional[str] = typer.Option(None, help="proxy path (default: the toy world's)"),
    grad: Optional[Path] = typer.Option(None, help="gradient .safetensors (default: computed for the toy world)"),
    traces: Optional[Path] = typer.Option(None, help="JSONL with {question, completion} for real positions"),
    teacher: Optional[str] = typer.Option(None, help="the teacher's tokenizer for the traces (default: the proxy's)"),
    out_dir: Path = typer.Option(Path("runs/fd-check"), help="where the table and PNG go"),
    n_sequences: int = typer.Option(3),
    positions: int = typer.Option(16, help="positions per sequence (the last N tokens)"),
    cache_dir: Path = typer.Option(Path(".cache/antidistill"), help="where the toy world's defaults are built"),
):
    """Appendix B.1 / Fig. 7: sine error of Δ̂ vs autograd over ε × dtype, and the best ε."""
    try:
        if proxy is None or grad is None or traces is None:
            defaults = default_artifacts(cache_dir)
            proxy, grad = proxy or defaults.proxy, grad or defaults.grad
            traces = traces or Path(defaults.holdout_traces)
        rows = read_jsonl(traces)
        tok = load_tokenizer(teacher or proxy)  # the proxy reads the teacher's token ids
        model = load_causal_lm(proxy)
        ids = [tok(prompt_text(tok, r["question"]) + r["completion"], add_special_tokens=False)["input_ids"]
               for r in rows[:n_sequences]]
        if not ids:
            raise ValueError("no sequences to check")
        width = min(positions, *map(len, ids))
        res = fd_check(model, grad, torch.tensor([x[-width:] for x in ids]))
    except ValueError as e:
        fail(e)
    table = Table(title="sine error of Δ̂ vs autograd ⟨∇θ log p, g⟩")
    for c in ("dtype", "difference", "ε", "mean", "max", "positions"):
        table.add_column(c)
    for r in res.rows:
        table.add_row(r["dtype"], r["difference"], "exact" if r["difference"] == "jvp" else f"{r['eps']:g}",
                      f"{r['mean_sine_error']:.2e}", f"{r['max_sine_error']:.2e}", str(r["n_positions"]))
    Console().print(table)
    best = {d: res.best_eps(d) for d in ("float32", "bfloat16")}
    write_json_atomic(out_dir / "fd_check.json", {"rows": res.rows, "best_eps": best})
    plot_fd_check(res, out_dir / "fd_error.png")
    typer.echo(f"recommended ε: {best['float32']:g} (float32), {best['bfloat16']:g} (bfloat16); "
               f"plot: {out_dir / 'fd_error.png'}")


def sweep(
    config: Optional[Path] = typer.Option(None, help="SweepConfig YAML"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value (dotted keys for nested)"),
    dry_run: bool = typer.Option(False, help="load tokenizers and model configs (no weights), check teacher and "
                                             "proxy, print the plan; writes nothing"),
):
    """Run (or resume) a sweep; writes results.parquet, plots and report.md under runs/<name>/."""
    try:
        cfg = load_config(SweepConfig, config, list(set_))
        if dry_run:
            for line in plan_sweep(cfg):
                typer.echo(line)
            return
        factory = None
        if cfg.engine == "vllm":
            from ..engines.vllm.offline import sweep_completer  # an optional extra: imported only when asked for
            from ..engines.vllm.setup import require_vllm

            require_vllm()
            factory = sweep_completer
        out = Run(cfg, completer_factory=factory).run()
    except (ValueError, ImportError) as e:
        fail(e)
    typer.echo(f"report: {out / 'report.md'}")


def calibrate_cmd(
    config: Optional[Path] = typer.Option(None, help="SweepConfig YAML (default: the demo's); its `calibration` section"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value (dotted keys for nested)"),
):
    """Holdout-only calibration: each arm's τ/λ for teacher-accuracy targets below greedy, on delivered traces.

    Writes runs/<name>-calibration/calibration.json (measured curves and the chosen grids).
    """
    try:
        cfg = load_config(SweepConfig, config or PACKAGE_CONFIGS / "demo.yaml", list(set_))
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}-calibration")
        path = calibrate(Run(cfg), cfg.calibration)
    except ValueError as e:
        fail(e)
    info = json.loads(path.read_text())
    if info.get("base_tau") is not None:
        typer.echo(f"best undefended (greedy) {info['best_undefended']:.3f}; base τ {info['base_tau']:g} "
                   f"({info['base_tau_reason']})")
    for arm, picks in info["chosen"].items():
        typer.echo(f"{arm}: " + ", ".join(f"{p['target']:+g} → {p['param']:g}" + ("" if p["inside_measured_range"]
                                                                                 else " (outside)") for p in picks))
    typer.echo(f"calibration: {path}")


def demo(
    quick: bool = typer.Option(False, help="a ≤ 60-second smoke run of the design (tiny world, one seed)"),
    full: bool = typer.Option(False, help="the resolving experiment: one sweep per world build (--worlds), each "
                              "world's compact results exported (--export-to) and pooled"),
    worlds: str = typer.Option("0", help="--full: the world seeds to build and run, e.g. '0-2' or '3,4'"),
    export_to: Optional[Path] = typer.Option(None, help="--full: export each finished world to EXPORT_TO/w<seed> "
                                             "and write the pooled report over all worlds there to its parent"),
    config: Optional[Path] = typer.Option(None, help="--full: the design to run per world build instead of the "
                                          "shipped full.yaml, e.g. src/antidistill/configs/transfer.yaml (issue 16)"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value"),
):
    """The main job: build or reuse the toy world, run the sweep, write the report and plots."""
    if quick and full:
        fail(ValueError("--quick and --full exclude each other"))
    if not full:
        if export_to is not None or worlds != "0" or config is not None:
            fail(ValueError("--worlds, --export-to and --config go with --full"))
        return sweep(config=PACKAGE_CONFIGS / ("quick.yaml" if quick else "demo.yaml"), set_=set_, dry_run=False)
    try:
        runs = run_worlds(config or PACKAGE_CONFIGS / "full.yaml", parse_world_seeds(worlds), list(set_),
                          export_to=export_to)
    except (ValueError, ImportError) as e:
        fail(e)
    for r in runs:
        typer.echo(f"report: {r / 'report.md'}")


def build_world_cmd(
    config: Optional[Path] = typer.Option(None, help="SweepConfig YAML (its `world` section is used)"),
    set_: list[str] = typer.Option([], "--set"),
):
    """Build (or find in the cache) the offline toy world and print its metrics."""
    try:
        cfg = load_config(SweepConfig, config or PACKAGE_CONFIGS / "demo.yaml", list(set_))
    except ValueError as e:
        fail(e)
    world = build_world(cfg.world, cfg.cache_dir, workers=cfg.workers)
    typer.echo(json.dumps({"root": str(world.root), **world.metrics}, indent=2))


def report(path: Path = typer.Argument(..., help="a run directory, a compact world directory (export-world) or a "
                                       "folder of them, e.g. runs/demo or docs/results/full/worlds"),
           pool: list[Path] = typer.Option([], "--pool", help="more results of the same design on other world "
                                           "builds (any kind PATH can be); their worlds join the pooled estimates"),
           out: Optional[Path] = typer.Option(None, "--out", help="where report.md and the plots go (default: PATH)")):
    """(Re)write report.md and the plots from results alone, pooled over every world build found."""
    try:
        written = write_report(path, tuple(pool), out=out)
    except (ValueError, OSError) as e:
        fail(e)
    typer.echo(f"report: {written}")


def export_world_cmd(run_dir: Path = typer.Argument(..., help="a sweep's run directory (one world build)"),
                     dest: Path = typer.Argument(..., help="the compact world directory to write, e.g. "
                                                 "docs/results/full/worlds/<world>")):
    """Write a run's compact world directory: every results row, config, calibration, gate, world metrics,
    FD check and loss histories; no model weights. `report --pool` reads it like a run directory."""
    try:
        written = export_world(run_dir, dest)
    except (ValueError, OSError) as e:
        fail(e)
    typer.echo(f"world: {written}")
