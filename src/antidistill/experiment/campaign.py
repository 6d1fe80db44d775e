"""``--full`` in parts: one sweep per world build, each world's compact results exported as it ends.

The world build is the unit of replication (``inference``), so ``--full`` is many independent
builds of the same design. A session runs a few (``world_seeds``), exports each finished world to
``export_to/w<seed>/`` (``results_io.export_world``: rows, calibration, gate, world metrics; no
weights) and rewrites the pooled report over every world found there, so worlds made in different
sessions pool into one report.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import load_config
from .gate import gate_on_record
from .report import write_report
from .results_io import export_world
from .sweep import Run
from .sweepconfig import SweepConfig


def parse_world_seeds(spec: str) -> list[int]:
    """``"0-2"`` → [0, 1, 2]; ``"3,5,7"`` → [3, 5, 7]; ``"4"`` → [4]."""
    seeds: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                seeds += list(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--worlds takes seeds like '0-2' or '3,5', got {spec!r}") from None
    if not seeds or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise ValueError(f"--worlds must name distinct non-negative seeds, got {spec!r}")
    return seeds


def run_worlds(config: str | Path, world_seeds: list[int], overrides: list[str] = (), *,
               export_to: str | Path | None = None, report_to: str | Path | None = None,
               progress: bool = True) -> list[Path]:
    """Run the sweep ``config`` once per world seed (run name ``<name>-w<seed>``), in order.

    Every config is loaded and validated before the first world starts. After each world:
    ``export_to/w<seed>`` gets its compact results, and the pooled report over every world in
    ``export_to`` is written to ``report_to`` (default: ``export_to``'s parent). Returns the run
    directories.
    """
    cfgs = []
    for s in world_seeds:
        base = load_config(SweepConfig, config, list(overrides))
        cfgs.append(load_config(SweepConfig, config, [*overrides, f"world.seed={s}", f"name={base.name}-w{s}"]))
    for cfg in cfgs:  # a world whose recorded gate is missing or failed stops the campaign before it starts
        gate_on_record(cfg)
    runs = []
    for s, cfg in zip(world_seeds, cfgs):
        t0 = time.perf_counter()
        run_dir = Run(cfg, progress=progress).run()
        runs.append(run_dir)
        if progress:
            print(f"world seed {s}: {run_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        if export_to is not None:
            export_world(run_dir, Path(export_to) / f"w{s}")
            out = Path(report_to) if report_to is not None else Path(export_to).parent
            write_report(export_to, out=out)
    return runs
