"""One way to make and save a figure: matplotlib's object-oriented API (no pyplot, no global backend),
written atomically as PNG."""

from __future__ import annotations

import contextlib

from matplotlib.figure import Figure

from ..io_utils import atomic_path


@contextlib.contextmanager
def png_figure(path, ncols: int = 1, figsize=(6, 4), nrows: int = 1, rect=(0, 0, 1, 1), **subplots):
    """Yield ``(fig, axes)`` (``Figure.subplots(nrows, ncols, **subplots)``); on exit lay the axes out
    inside ``rect`` (figure fraction; room outside it for a figure legend) and write ``path``
    atomically as PNG."""
    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, **subplots)
    yield fig, axes
    fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
