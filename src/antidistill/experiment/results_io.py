"""Results from any source, as one table: run directories, compact world directories, folders of them.

A *compact world directory* is what ``--full`` commits per world build (``docs/results/full/worlds/<world>/``):
every results row (``results.csv``), the world's ``config.yaml``, ``calibration.json``, ``gate.json``,
``world.json`` and ``fd_check.json``, and the students' loss histories (``histories.json``); no model
weights. :func:`export_world` writes one from a run directory; :func:`load_sources` reads run
directories, compact directories and folders holding either kind, so a report can pool worlds
built in different places and sessions.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import yaml

from ..io_utils import atomic_dir
from .rundir import RunDir
from .transfer import fill_panel_labels

COMPACT_RESULTS = "results.csv"
HISTORIES = "histories.json"
METADATA = ("config", "calibration", "gate", "world", "fd_check")  # RunDir properties copied as they are


@dataclasses.dataclass
class Source:
    """One results source: its rows and the metadata files it holds (None where it has none)."""

    root: Path
    kind: str  # "run" (a sweep's run directory) or "compact" (an exported world directory)
    results: pd.DataFrame
    config_text: str
    calibration: dict | None
    gate: dict | None
    world_metrics: dict | None
    fd_check: dict | None
    histories: dict[str, list[dict]]  # point name → the student's loss history

    @property
    def config(self) -> dict:
        return yaml.safe_load(self.config_text) or {}

    @property
    def worlds(self) -> list[str]:
        return sorted(self.results["world"].unique())


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _kind(path: Path) -> str | None:
    if (path / "results.parquet").is_file():
        return "run"
    if (path / COMPACT_RESULTS).is_file():
        return "compact"
    return None


def _run_histories(files: RunDir) -> dict[str, list[dict]]:
    out = {}
    for point in sorted((files.root / "points").glob("*")):
        for h in (point / "student" / "history.json", point / "history.json"):  # older runs kept it beside the folder
            if h.is_file():
                out[point.name] = json.loads(h.read_text())
                break
    return out


def load_source(path: str | Path) -> Source:
    """Read one run directory or compact world directory (ValueError naming ``path`` otherwise)."""
    path = Path(path)
    kind = _kind(path)
    if kind is None:
        raise ValueError(f"{path}: neither a run directory (results.parquet) nor a compact world directory "
                         f"({COMPACT_RESULTS})")
    files = RunDir(path)
    if not files.config.is_file():
        raise ValueError(f"{path}: no config.yaml beside its results")
    try:
        if kind == "run":
            df = pd.read_parquet(files.results)
        else:
            df = pd.read_csv(path / COMPACT_RESULTS, dtype={"world": str})
    except Exception as e:  # noqa: BLE001 - any unreadable table is a bad input, named by its path
        raise ValueError(f"{path}: cannot read its results table ({e})") from e
    missing = {"method", "seed", "teacher_acc", "student_acc"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: its results table lacks the columns {sorted(missing)}")
    # older tables have no world column: the directory is then one world build, named by its folder
    df["world"] = df["world"].astype(str) if "world" in df.columns else path.resolve().name
    df = fill_panel_labels(df)  # older tables: the shipped proxy and the base student (issue 16's columns)
    histories = _run_histories(files) if kind == "run" else (_json(path / HISTORIES) or {})
    return Source(root=path, kind=kind, results=df, config_text=files.config.read_text(),
                  calibration=_json(files.calibration), gate=_json(files.gate), world_metrics=_json(files.world),
                  fd_check=_json(files.fd_check), histories=histories)


def _natural(path: Path) -> list:
    """A folder name's sort key with its numbers as numbers: ``w2`` before ``w10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]


def find_sources(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run or compact directory, else its subfolders that are (in natural order:
    ``w2`` before ``w10``)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory")
    if _kind(path):
        return [path]
    found = sorted((p for p in path.iterdir() if p.is_dir() and _kind(p)), key=_natural)
    if not found:
        raise ValueError(f"{path}: holds no results (no results.parquet or {COMPACT_RESULTS} in it or in its "
                         "subfolders)")
    return found


def load_sources(paths) -> list[Source]:
    """Every source under ``paths`` (each a run directory, a compact world directory or a folder of them).

    A world build may appear only once: pooling it twice would count one build as two.
    """
    sources = [load_source(p) for path in paths for p in find_sources(path)]
    seen: dict[str, Path] = {}
    for s in sources:
        for w in s.worlds:
            if w in seen:
                raise ValueError(f"world {w!r} appears in both {seen[w]} and {s.root}: pool each world build once")
            seen[w] = s.root
    return sources


def recorded_gate(worlds: str | Path, world) -> tuple[dict, Path]:
    """The gate recorded under ``worlds`` for the world build ``world`` (a ``ToyWorldConfig``), and where.

    ``worlds`` is a run directory, a compact world directory or a folder of them (``find_sources``); the
    source whose ``config.yaml`` builds the same world (``world.key()``: the zoo aside) and holds a
    ``gate.json`` is the one read. A design that runs on worlds another design has gated (the transfer
    matrix on ``--full``'s) reads the gate from there instead of measuring it anew. ``ValueError`` when
    no source builds that world with a gate, or when two record different gates.
    """
    key = world.key()
    found: dict[Path, dict] = {}
    for path in find_sources(worlds):
        files = RunDir(path)
        gate = _json(files.gate)
        if gate is None or not files.config.is_file():
            continue
        recorded = yaml.safe_load(files.config.read_text()) or {}
        if recorded.get("dataset", "toy") != "toy":  # its `world` section is an unused default
            continue
        spec = recorded.get("world")
        try:
            built = type(world)(**spec).key() if isinstance(spec, dict) else None
        except (TypeError, ValueError):  # another world format: not this build
            continue
        if built == key:
            found[path] = gate
    if not found:
        raise ValueError(f"{worlds}: no run or world directory there builds world seed {world.seed} (key {key}) "
                         "with a gate.json: run that world's gated design first, or measure the gate here")
    if len({json.dumps(g, sort_keys=True) for g in found.values()}) > 1:
        raise ValueError(f"{worlds}: {sorted(map(str, found))} build the same world (key {key}) with different "
                         "gates: keep one")
    path = sorted(found)[0]
    return found[path], path


def pooled_results(sources: list[Source]) -> pd.DataFrame:
    """All sources' rows in one table (columns a source lacks are NaN)."""
    return pd.concat([s.results for s in sources], ignore_index=True)


def own_seed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a sweep ran at its own ``seeds``, without its ``replicate`` seeds: each row's seed against the
    ``seeds`` of the config it records (``config``, JSON). Rows without a recorded config are kept.

    The adaptive distillers, the panel and the gate run at a sweep's own seeds only, and a design registered
    before replicates were added is read on these rows."""
    if "config" not in df.columns or "seed" not in df.columns:
        return df
    seeds = {c: set(json.loads(c).get("seeds", [])) if isinstance(c, str) else None for c in df.config.unique()}
    keep = [seeds[c] is None or s in seeds[c] for c, s in zip(df.config, df.seed)]
    return df[keep]


def export_world(run_dir: str | Path, dest: str | Path) -> Path:
    """Write ``dest`` as the compact world directory of ``run_dir`` (atomically; no model weights).

    ``results.csv`` holds every row of ``results.parquet``; the metadata files are copied as they
    are; ``histories.json`` holds each point's student loss history. An existing compact world
    directory (or empty folder) at ``dest`` is replaced; anything else there is refused.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    if _kind(run_dir) != "run":
        raise ValueError(f"{run_dir}: not a run directory (no results.parquet); run the sweep first")
    src = load_source(run_dir)
    if dest.resolve() == run_dir.resolve():
        raise ValueError(f"{dest}: the destination is the run directory itself")
    if dest.exists() and not (dest.is_dir() and (_kind(dest) == "compact" or not any(dest.iterdir()))):
        raise ValueError(f"{dest}: exists and is not a compact world directory; export-world replaces only those")
    files = RunDir(run_dir)
    with atomic_dir(dest) as tmp:
        src.results.to_csv(tmp / COMPACT_RESULTS, index=False)
        for name in METADATA:
            f = getattr(files, name)
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        (tmp / HISTORIES).write_text(json.dumps(src.histories))
    return dest
