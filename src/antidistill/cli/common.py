"""What every command shares: the package's configs and one way to fail."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# what a user's mistake raises (a bad value, a missing file, an absent optional extra): an error
# message, never a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def fail(e: Exception) -> None:
    """Print ``error: …`` in red and exit with status 2 (bad input; nothing was written)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def reports_errors(command):
    """Wrap a typer command so that a user's mistake (:data:`USER_ERRORS`) ends in :func:`fail`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            fail(e)

    return wrapper
