"""A run directory's layout, and the one way a stage produces an artifact in it.

The sweep writes these paths and the report reads them, so neither imports the other. Every
artifact is written atomically (``io_utils``), so a path that exists holds a finished stage.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def point_name(method: str, param: float, seed: int) -> str:
    return f"{method}_{param:g}_s{seed}"


def stage(path: Path, make: Callable[[Path], object]) -> Path:
    """Produce ``path`` with ``make(path)`` unless it exists; return ``path``.

    ``make`` must write ``path`` atomically (``io_utils.atomic_path``/``atomic_dir`` or a writer
    built on them), so that a stage killed half-way leaves no ``path`` and runs again on resume.
    """
    if not path.exists():
        make(path)
    return path


class RunDir:
    """The files of one run: ``runs/<name>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    world = property(lambda self: self.root / "world.json")  # toy-world metrics (toy runs only)
    holdout_traces = property(lambda self: self.root / "holdout_traces.jsonl")
    gradient = property(lambda self: self.root / "proxy_grad.safetensors")
    whitebox_gradient = property(lambda self: self.root / "student_grad.safetensors")  # white-box arms' g
    random_direction = property(lambda self: self.root / "random_direction.safetensors")  # g's norm-matched stand-in

    def remove_stale_temporaries(self) -> None:
        """Delete the ``.*.tmp`` files and folders a killed run left behind (never read: the rename never
        happened). A run directory has one writer; do not run the same sweep twice at once."""
        for p in sorted(self.root.rglob(".*.tmp"), key=lambda q: len(q.parts), reverse=True):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

    def named_gradient(self, name: str) -> Path:
        """g over a named zoo proxy's or panel student's weights (the arms ``<arm>@<name>``)."""
        return self.root / "gradients" / f"{name}.safetensors"
    calibration = property(lambda self: self.root / "calibration.json")
    gate = property(lambda self: self.root / "gate.json")  # the student-learns-from-teacher gate
    fd_check = property(lambda self: self.root / "fd_check.json")
    fd_plot = property(lambda self: self.root / "fd_error.png")
    results = property(lambda self: self.root / "results.parquet")
    report = property(lambda self: self.root / "report.md")
    tradeoff_plot = property(lambda self: self.root / "tradeoff.png")
    forest_plot = property(lambda self: self.root / "forest.png")  # arm effects per world and target
    loss_plot = property(lambda self: self.root / "loss_dynamics.png")

    def point(self, method: str, param: float, seed: int) -> PointDir:
        return PointDir(self.root / "points" / point_name(method, param, seed))

    def distiller(self, kind: str) -> Path:
        """Run-level artifacts of an adaptive distiller, shared by every point of a seed (warm-start students,
        the student's own samples, the clean-set gradient)."""
        return self.root / "distillers" / kind


class PointDir:
    """The files of one sweep point, in the order its stages write them."""

    def __init__(self, root: Path):
        self.root = root

    traces = property(lambda self: self.root / "traces.jsonl")  # teacher traces on train
    teacher_test = property(lambda self: self.root / "teacher_test.jsonl")
    student = property(lambda self: self.root / "student")  # the distilled student (a model folder)
    history = property(lambda self: self.root / "student" / "history.json")  # its loss history, in one rename
    student_test = property(lambda self: self.root / "student_test.jsonl")
    result = property(lambda self: self.root / "result.json")  # the point's row, written last

    def distiller(self, kind: str) -> DistillerDir:
        """The files of this point's student under an adaptive distiller (the naive one keeps the paths above)."""
        return DistillerDir(self, kind)

    def panel(self, name: str) -> PanelDir:
        """The files of this point's traces distilled into panel student ``name`` (the base student keeps the
        paths above)."""
        return PanelDir(self, name)


class DistillerDir(PointDir):
    """One point's student under adaptive distiller ``kind``: ``points/<point>/distillers/<kind>/``.

    The teacher's traces stay the point's own (``traces``, ``teacher_test``); the training set the distiller
    made from them, its student, the student's test rows and the row are its own.
    """

    def __init__(self, point: PointDir, kind: str):
        super().__init__(point.root / "distillers" / kind)
        self.point = point

    traces = property(lambda self: self.point.traces)
    teacher_test = property(lambda self: self.point.teacher_test)
    train_set = property(lambda self: self.root / "train.jsonl")  # what the student trains on (with weights)


class PanelDir(PointDir):
    """One point's traces distilled into a panel student: ``points/<point>/panel/<name>/``.

    The teacher's traces stay the point's own (``traces``, ``teacher_test``); the student, its test rows and
    the row are its own."""

    def __init__(self, point: PointDir, name: str):
        super().__init__(point.root / "panel" / name)
        self.point = point

    traces = property(lambda self: self.point.traces)
    teacher_test = property(lambda self: self.point.teacher_test)
