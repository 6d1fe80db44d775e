"""The command line: each command only wires library functions together.

``cli.experiment`` holds the experiment's commands, ``cli.options`` derives options from the config
classes; the server is imported only when ``serve`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import load_config
from ..io_utils import close_distributed
from ..progress import quiet_libraries
from . import experiment
from .common import fail

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Antidistillation sampling: sample, check, experiment, serve.")


@app.callback()
def _setup(ctx: typer.Context) -> None:
    quiet_libraries()
    ctx.call_on_close(close_distributed)  # under `accelerate launch`, every command ends its process group


app.command()(experiment.generate)
app.command()(experiment.gradient)
app.command("distill")(experiment.distill_cmd)
app.command("check-fd")(experiment.check_fd)
app.command()(experiment.sweep)
app.command()(experiment.demo)
app.command("build-world")(experiment.build_world_cmd)
app.command()(experiment.report)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, help="ServeConfig YAML"),
    teacher: Optional[str] = typer.Option(None, help="teacher path (default: the toy world's)"),
    proxy: Optional[str] = typer.Option(None),
    grad: Optional[str] = typer.Option(None, help="proxy gradient .safetensors"),
    lam: Optional[float] = typer.Option(None, help="λ (operator-only; 0 serves the plain teacher)"),
    eps: Optional[float] = typer.Option(None),
    difference: Optional[str] = typer.Option(None),
    host: Optional[str] = typer.Option(None),
    port: Optional[int] = typer.Option(None),
    api_key: Optional[str] = typer.Option(None, envvar="ANTIDISTILL_API_KEY", help="require this bearer key"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value"),
    engine: str = typer.Option("hf", help="hf (the embedded engine) | vllm (vLLM's OpenAI server, docs/vllm.md)"),
):
    """Serve the teacher behind an OpenAI-compatible API with antidistillation sampling."""
    import uvicorn

    from ..serve.app import build_server
    from ..serve.config import ServeConfig

    explicit = dict(teacher=teacher, proxy=proxy, grad=grad, lam=lam, eps=eps, difference=difference, host=host,
                    port=port, api_key=api_key)
    try:
        cfg = load_config(ServeConfig, config, list(set_), explicit)
        if engine == "vllm":
            from ..engines.vllm.server import serve as serve_vllm

            return serve_vllm(teacher=cfg.teacher, proxy=cfg.proxy, grad=cfg.grad, lam=cfg.lam, eps=cfg.eps,
                              tau=cfg.tau, difference=cfg.difference, host=cfg.host, port=cfg.port,
                              api_key=cfg.api_key, model_name=cfg.model_name, max_num_seqs=cfg.max_batch,
                              max_model_len=cfg.max_prompt_tokens + cfg.max_tokens, allow_logprobs=cfg.allow_logprobs,
                              workdir=Path(cfg.cache_dir) / "vllm-serve")
        if engine != "hf":
            raise ValueError(f"--engine must be hf or vllm, got {engine!r}")
        application, batch_engine = build_server(cfg)
    except (ValueError, ImportError) as e:
        fail(e)
    try:
        uvicorn.run(application, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        batch_engine.stop()
