"""What every command shares: the package's configs and one way to fail."""

from __future__ import annotations

from pathlib import Path

import typer

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fail(e: Exception) -> None:
    """Print ``error: …`` in red and exit with status 2 (bad input; nothing was written)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
