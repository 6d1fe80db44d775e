"""Rich progress bars, quiet when disabled or off a terminal in CI logs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

import datasets
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def track(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        yield from progress.track(items, description=description, total=total)


def quiet_libraries() -> None:
    """Silence per-call progress bars and info logs of transformers, datasets and math-verify.

    Our own rich progress bars say what is happening; the libraries' would repeat it per model load
    and per distillation.
    """
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("math_verify", "latex2sympy2_extended", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
