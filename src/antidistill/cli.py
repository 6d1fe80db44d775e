"""The command line: each command only wires library functions together."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Antidistillation sampling: sample, check, experiment, serve.")


@app.callback()
def _setup(ctx: typer.Context) -> None:
    from .io_utils import close_distributed
    from .progress import quiet_libraries

    quiet_libraries()
    ctx.call_on_close(close_distributed)  # under `accelerate launch`, every command ends its process group

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _settings(config: Optional[Path], overrides: list[str], **explicit):
    from .config import load_config
    from .settings import SamplingSettings

    return load_config(SamplingSettings, config, list(overrides), explicit)


@app.command()
def generate(
    teacher: str = typer.Option(..., help="teacher model path"),
    problems: Path = typer.Option(..., help="JSONL of {id, question, answer}"),
    out: Path = typer.Option(..., help="output JSONL: traces, correctness, settings"),
    method: Optional[str] = typer.Option(None, help="greedy | temperature | antidistill | permutation"),
    proxy: Optional[str] = typer.Option(None, help="proxy model path (antidistill, permutation)"),
    grad: Optional[Path] = typer.Option(None, help="proxy gradient .safetensors"),
    lam: Optional[float] = typer.Option(None),
    eps: Optional[float] = typer.Option(None),
    tau: Optional[float] = typer.Option(None, help="the temperature τ of eq. 1 / eq. 11"),
    difference: Optional[str] = typer.Option(None, help="central | forward | jvp"),
    top_p: Optional[float] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    limit: Optional[int] = typer.Option(None, help="only the first N problems"),
    config: Optional[Path] = typer.Option(None, help="SamplingSettings YAML"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: key=value"),
):
    """Generate traces for a set of problems with one sampling method, force answers, and score them."""
    import json
    from dataclasses import asdict

    from .tokenizers import load_tokenizer

    from .data import read_jsonl, write_jsonl, require_keys
    from .evaluate import accuracy_summary
    from .generation import build_processor, generate_traces
    from .io_utils import provenance
    from .proxy import load_causal_lm

    try:
        s = _settings(config, set_, method=method, lam=lam, eps=eps, tau=tau, difference=difference, top_p=top_p,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        if s.uses_proxy and (proxy is None or grad is None):
            raise ValueError(f"method={s.method!r} needs --proxy and --grad")
        rows_in = read_jsonl(problems)[:limit]
        if not rows_in:
            raise ValueError(f"{problems}: no problems")
        require_keys(rows_in, problems, ("question", "answer"))
        for i, r in enumerate(rows_in, 1):
            r.setdefault("id", f"row-{i}")
        tok = load_tokenizer(teacher)
        model = load_causal_lm(teacher)
        proc = None
        if s.uses_proxy:
            ptok = load_tokenizer(proxy)
            proc = build_processor(s, load_causal_lm(proxy), grad, tok, ptok)
        rows = generate_traces(model, tok, rows_in, s, processor=proc)
    except ValueError as e:
        _fail(e)
    from .io_utils import distributed_state

    state = distributed_state()
    if not state.is_main_process:
        return
    meta = {"settings": asdict(s), "teacher": teacher, "proxy": proxy, "grad": str(grad) if grad else None,
            "n_processes": state.num_processes, **provenance()}
    write_jsonl(out, [r | {"meta": meta} for r in rows])
    typer.echo(json.dumps({"out": str(out), "n": len(rows), "accuracy": accuracy_summary(rows)["accuracy"]}))


@app.command()
def gradient(
    proxy: str = typer.Option(..., help="proxy model path"),
    traces: Path = typer.Option(..., help="JSONL of teacher traces on holdout: {question, completion}"),
    out: Path = typer.Option(..., help="output .safetensors"),
    batch_size: int = typer.Option(8),
):
    """Compute the proxy gradient g once (eq. 7) and save it as safetensors. Works under `accelerate launch`."""
    from .io_utils import distributed_state
    from .tokenizers import load_tokenizer

    from .data import read_jsonl, require_keys
    from .gradient import compute_proxy_gradient, save_gradient
    from .proxy import load_causal_lm

    try:
        rows = read_jsonl(traces)
        require_keys(rows, traces, ("question", "completion"))
        result = compute_proxy_gradient(load_causal_lm(proxy), load_tokenizer(proxy), rows,
                                        batch_size=batch_size)
    except ValueError as e:
        _fail(e)
    if distributed_state().is_main_process:
        save_gradient(out, result)
        typer.echo(f"saved {out}: loss {result.loss:.4f} over {result.n_tokens} tokens of {result.n_traces} traces")


@app.command("distill")
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
    import json

    from .io_utils import distributed_state

    from .config import load_config
    from .data import read_jsonl, require_keys
    from .distill import DistillConfig, distill
    from .tokenizers import load_tokenizer
    from .io_utils import atomic_dir, write_json_atomic
    from .proxy import load_causal_lm

    try:
        cfg = load_config(DistillConfig, config, list(set_))
        rows = read_jsonl(traces)
        require_keys(rows, traces, ("question", "completion"))
        evals = read_jsonl(eval_traces) if eval_traces else None
        tok = load_tokenizer(student)
        model, history = distill(load_causal_lm(student), tok, rows, cfg, output_dir=out.parent / f".{out.name}.trainer",
                                 eval_traces=evals, seed=seed)
    except ValueError as e:
        _fail(e)
    if distributed_state().is_main_process:
        import shutil

        shutil.rmtree(out.parent / f".{out.name}.trainer", ignore_errors=True)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_json_atomic(out / "history.json", history)
        typer.echo(json.dumps({"out": str(out), "steps": max((h["step"] for h in history), default=0)}))


@app.command("check-fd")
def check_fd(
    proxy: Optional[str] = typer.Option(None, help="proxy path (default: the toy world's)"),
    grad: Optional[Path] = typer.Option(None, help="gradient .safetensors (default: computed for the toy world)"),
    traces: Optional[Path] = typer.Option(None, help="JSONL with {question, completion} for real positions"),
    out_dir: Path = typer.Option(Path("runs/fd-check"), help="where the table and PNG go"),
    n_sequences: int = typer.Option(3),
    positions: int = typer.Option(16, help="positions per sequence (the last N tokens)"),
):
    """Appendix B.1 / Fig. 7: sine error of Δ̂ vs autograd over ε × dtype, and the best ε."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from .tokenizers import load_tokenizer

    from .data import read_jsonl
    from .fdcheck import fd_check, plot_fd_check
    from .io_utils import write_json_atomic
    from .prompting import prompt_text
    from .proxy import load_causal_lm

    try:
        if proxy is None or grad is None or traces is None:
            from .sweep import Run, SweepConfig

            run = Run(_load_sweep(PACKAGE_CONFIGS / "demo.yaml", ["name=fd-check-world"]))
            proxy, grad = proxy or run.paths["proxy"], grad or run.gradient_path()
            rows = read_jsonl(traces) if traces else run.holdout_traces()
        else:
            rows = read_jsonl(traces)
        tok = load_tokenizer(proxy)
        model = load_causal_lm(proxy).float()
        ids = [tok(prompt_text(tok, r["question"]) + r["completion"], add_special_tokens=False)["input_ids"]
               for r in rows[:n_sequences]]
        if not ids:
            raise ValueError("no sequences to check")
        width = min(positions, *map(len, ids))
        batch = torch.tensor([x[-width:] for x in ids])
        res = fd_check(model, grad, batch, pad_token_id=tok.pad_token_id)
    except ValueError as e:
        _fail(e)
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


def _load_sweep(config: Optional[Path], overrides: list[str]):
    from .config import load_config
    from .sweep import SweepConfig

    return load_config(SweepConfig, config, overrides)


@app.command()
def sweep(
    config: Optional[Path] = typer.Option(None, help="SweepConfig YAML"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value (dotted keys for nested)"),
):
    """Run (or resume) a sweep; writes results.parquet, plots and report.md under runs/<name>/."""
    from .sweep import Run

    try:
        cfg = _load_sweep(config, set_)
        out = Run(cfg).run()
    except ValueError as e:
        _fail(e)
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def demo(
    quick: bool = typer.Option(False, help="a ≤ 3-minute smoke version (small world, one seed)"),
    full: bool = typer.Option(False, help="the full, resolving experiment (≥ 5 seeds, more test problems)"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value"),
):
    """The main job: build or reuse the toy world, run the sweep, write the report and plots."""
    name = "quick" if quick else "full" if full else "demo"
    sweep(config=PACKAGE_CONFIGS / f"{name}.yaml", set_=set_)


@app.command("build-world")
def build_world_cmd(
    config: Optional[Path] = typer.Option(None, help="SweepConfig YAML (its `world` section is used)"),
    set_: list[str] = typer.Option([], "--set"),
):
    """Build (or find in the cache) the offline toy world and print its metrics."""
    import json

    from .toyworld.build import build_world

    cfg = _load_sweep(config or PACKAGE_CONFIGS / "demo.yaml", set_)
    world = build_world(cfg.world, cfg.cache_dir, workers=cfg.workers)
    typer.echo(json.dumps({"root": str(world.root), **world.metrics}, indent=2))


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, help="ServeConfig YAML"),
    teacher: Optional[str] = typer.Option(None, help="teacher path (default: the toy world's)"),
    proxy: Optional[str] = typer.Option(None),
    grad: Optional[str] = typer.Option(None, help="proxy gradient .safetensors"),
    lam: Optional[float] = typer.Option(None, help="λ (operator-only; 0 serves the plain teacher)"),
    eps: Optional[float] = typer.Option(None),
    tau: Optional[float] = typer.Option(None, help="the operator's τ (requests can only flatten eq. 11)"),
    difference: Optional[str] = typer.Option(None, help="central or forward (jvp cannot be served)"),
    host: Optional[str] = typer.Option(None),
    port: Optional[int] = typer.Option(None),
    api_key: Optional[str] = typer.Option(None, envvar="ANTIDISTILL_API_KEY", help="require this bearer key"),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth",
                                          help="allow serving without a key on a non-loopback host"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value"),
):
    """Serve the teacher behind an OpenAI-compatible API with antidistillation sampling."""
    from .config import load_config
    from .serve.app import serve_forever
    from .serve.config import ServeConfig

    explicit = dict(teacher=teacher, proxy=proxy, grad=grad, lam=lam, eps=eps, tau=tau, difference=difference,
                    host=host, port=port, api_key=api_key, insecure_no_auth=insecure_no_auth or None)
    try:
        cfg = load_config(ServeConfig, config, list(set_), explicit)
    except ValueError as e:
        _fail(e)
    try:
        serve_forever(cfg)
    except ValueError as e:
        _fail(e)


if __name__ == "__main__":  # pragma: no cover
    app()
