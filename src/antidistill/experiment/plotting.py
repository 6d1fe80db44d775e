"""One way to make and save a figure: headless backend, atomic PNG write, figure closed after."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def png_figure(path, ncols: int = 1, figsize=(6, 4)):
    """Yield ``(fig, axes)``; on exit lay out, write ``path`` atomically as PNG and close the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io_utils import atomic_path

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
