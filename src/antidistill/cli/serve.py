"""``antidistill serve``: the OpenAI-compatible server, on the embedded engine or on vLLM.

The server's app (FastAPI, uvicorn) and the vLLM engine are imported only when the command runs.
Paths left out are filled in here with the toy world's (``experiment.defaults``), so the server
itself never imports the experiment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import load_config
from ..experiment.defaults import default_artifacts
from ..serve.config import ServeConfig
from .common import fail
from .options import config_options

SERVE_OPTIONS = ["teacher", "proxy", "grad", "sampling.lam", "sampling.eps", "sampling.tau", "sampling.difference",
                 "host", "port", "insecure_no_auth"]


def with_default_paths(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with the toy world's teacher, proxy and g (built once, cached under ``cfg.cache_dir``)
    in place of the paths it leaves out; unchanged when it names the teacher and, for λ ≠ 0, proxy and g."""
    s = cfg.sampling
    if cfg.teacher is not None and (s.lam == 0 or (cfg.proxy is not None and cfg.grad is not None)):
        return cfg
    d = default_artifacts(cfg.cache_dir)
    return dataclasses.replace(cfg, teacher=cfg.teacher or d.teacher, proxy=cfg.proxy or d.proxy,
                               grad=cfg.grad or d.grad)


@config_options(ServeConfig, SERVE_OPTIONS)
def serve(
    config: Optional[Path] = typer.Option(None, help="ServeConfig YAML"),
    api_key: Optional[str] = typer.Option(None, envvar="ANTIDISTILL_API_KEY", help="require this bearer key"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value (e.g. max_batch=16)"),
    engine: str = typer.Option("hf", help="hf (the embedded engine) | vllm (vLLM's OpenAI server, docs/vllm.md)"),
    *,
    values: dict[str, Any],
):
    """Serve the teacher behind an OpenAI-compatible API with antidistillation sampling."""
    try:
        cfg = with_default_paths(load_config(ServeConfig, config, list(set_), values | {"api_key": api_key}))
        if engine == "vllm":
            from ..engines.vllm.server import serve as serve_vllm

            s = cfg.sampling
            return serve_vllm(teacher=cfg.teacher, proxy=cfg.proxy, grad=cfg.grad, lam=s.lam, eps=s.eps, tau=s.tau,
                              difference=s.difference, host=cfg.host, port=cfg.port, api_key=cfg.api_key,
                              policy=cfg.policy(), model_name=cfg.model_name, max_num_seqs=cfg.max_batch,
                              workdir=Path(cfg.cache_dir) / "vllm-serve")
        if engine != "hf":
            raise ValueError(f"--engine must be hf or vllm, got {engine!r}")
        from ..serve.app import serve_forever

        serve_forever(cfg)
    except (ValueError, ImportError) as e:
        fail(e)
