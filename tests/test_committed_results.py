"""The committed `--full` results: `antidistill report` over `docs/results/full/worlds` reproduces the committed
report and the README's headline table, cell by cell (issue 19: "report --pool over the committed worlds
reproduces the README's headline")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from antidistill.experiment.inference import PRIMARY_TARGET, primary_effect
from antidistill.experiment.report import report_frames, write_report
from antidistill.experiment.results_io import load_sources

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "docs" / "results" / "full"
README = ROOT / "README.md"

# README row label → (arm, outcome, scale, digits)
HEADLINE_ROWS = {
    "antidistillation (cross-family proxy) − temperature, student accuracy": ("antidistill", "student_acc", 100.0, 1),
    "white-box antidistillation − temperature": ("whitebox", "student_acc", 100.0, 1),
    "antidistillation − temperature, student NLL on true solutions (nats/token)":
        ("antidistill", "student_test_nll", 1.0, 3),
}

pytestmark = pytest.mark.skipif(not (FULL / "worlds").is_dir(), reason="no committed --full worlds")


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _readme_table() -> tuple[list[str], dict[str, list[str]]]:
    """The README's primary-endpoint table: its header cells and each row's cells, by row label."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| at the {_signed(PRIMARY_TARGET, 0)}"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header[1:], rows


@pytest.fixture(scope="module")
def frames():
    return report_frames(load_sources([FULL / "worlds"]))


def test_report_regenerates_byte_for_byte(tmp_path, monkeypatch):
    """The committed report.md is what `antidistill report` writes from the committed worlds today."""
    monkeypatch.chdir(ROOT)  # the report names its sources by the path given, as the README's command does
    written = write_report(Path("docs/results/full/worlds"), out=tmp_path)
    assert written.read_text() == (FULL / "report.md").read_text(), (
        "docs/results/full/report.md is stale: run `antidistill report docs/results/full/worlds --out "
        "docs/results/full` and commit it")


def test_readme_headline_is_the_pooled_result(frames):
    """Each README headline cell, per world and pooled with its t(K−1) interval, is the pooled estimate."""
    header, rows = _readme_table()
    seeds = {str(w["world"]): w["seed"] for w in frames.worlds}
    world_columns = [re.fullmatch(r"world (\d+)(?: \((\d+) seeds\))?", h).groups() for h in header[:-1]]
    # a world column names its seed count at the primary target when it has more than one
    at_target = frames.design[(frames.design.target == PRIMARY_TARGET) & (frames.design.method == "antidistill")]
    n_seeds = {str(seeds[w]): n for w, n in at_target.groupby("world").seed.nunique().items()}
    for column, n in world_columns:
        assert (int(n) if n else 1) == n_seeds[column] and n != "1", f"README header of world {column}"
    world_columns = [column for column, _ in world_columns]
    for label, (arm, y, scale, digits) in HEADLINE_ROWS.items():
        assert label in rows, f"README lacks the row {label!r}"
        e = primary_effect(frames.design, arm, y=y)
        assert e["target"] == PRIMARY_TARGET
        by_seed = {str(seeds[w]): d for w, d in e["worlds"].items()}
        assert sorted(by_seed, key=int) == sorted(world_columns, key=int), "README columns are not the pooled worlds"
        cells = rows[label]
        assert len(cells) == len(header), f"README row {label!r} has {len(cells)} cells for {len(header)} columns"
        for column, cell in zip(world_columns, cells[:-1]):
            assert cell == _signed(scale * by_seed[column], digits), (label, column)
        pooled = (f"{_signed(scale * e['estimate'], digits)} [{_signed(scale * e['ci_low'], digits)}, "
                  f"{_signed(scale * e['ci_high'], digits)}]")
        assert cells[-1] == pooled, label
        assert header[-1] == f"mean [95% t({e['n_worlds'] - 1}) CI]"
