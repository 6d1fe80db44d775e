"""One way to make and save a figure: matplotlib's object-oriented API (no pyplot, no global backend),
written atomically as PNG."""

from __future__ import annotations

import contextlib

from matplotlib.figure import Figure

from ..io_utils import atomic_path


@contextlib.contextmanager
def png_figure(path, ncols: int = 1, figsize=(6, 4)):
    """Yield ``(fig, axes)``; on exit lay out and write ``path`` atomically as PNG."""
    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    yield fig, axes
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
