"""The command line: each command only wires library functions together.

``cli.experiment`` holds the experiment's commands, ``cli.options`` derives options from the config
classes; the server is imported only when ``serve`` runs.
"""

from __future__ import annotations

import typer

from ..runtime import close_distributed, quiet_libraries
from . import experiment, serve
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
app.command("export-world")(experiment.export_world_cmd)
app.command("calibrate")(experiment.calibrate_cmd)
app.command()(serve.serve)
