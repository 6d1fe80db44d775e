"""``python -m antidistill.cli``: the same commands as the ``antidistill`` script."""

from . import app

app()
