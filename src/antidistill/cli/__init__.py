"""The command line: each command only wires library functions together.

``cli.experiment`` holds the experiment's commands, ``cli.options`` derives options from the config
classes; the server is imported only when ``serve`` runs.
"""

from __future__ import annotations

import typer

from ..runtime import close_distributed, quiet_libraries
from . import experiment, serve
from .common import reports_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Antidistillation sampling: sample, check, experiment, serve.")


@app.callback()
def _setup(ctx: typer.Context) -> None:
    quiet_libraries()
    ctx.call_on_close(close_distributed)  # under `accelerate launch`, every command ends its process group


COMMANDS = {
    "generate": experiment.generate,
    "gradient": experiment.gradient,
    "distill": experiment.distill_cmd,
    "check-fd": experiment.check_fd,
    "check-tokenizers": experiment.check_tokenizers,
    "sweep": experiment.sweep,
    "demo": experiment.demo,
    "build-world": experiment.build_world_cmd,
    "report": experiment.report,
    "export-world": experiment.export_world_cmd,
    "calibrate": experiment.calibrate_cmd,
    "transfer-score": experiment.transfer_score_cmd,
    "serve": serve.serve,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(reports_errors(_command))
