"""Atomic writes and provenance: every artifact is whole or absent, and says what made it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from accelerate import PartialState

from . import __version__
from .progress import quiet_libraries


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a reader
    never sees a half-written artifact, even after SIGKILL (the rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory: build it under a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def provenance() -> dict[str, str]:
    """Library versions and the time: recorded in every artifact."""
    out = {
        "antidistill_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for mod in ("peft", "trl", "accelerate"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def distributed_state():
    """accelerate's ``PartialState``, on the CPU (gloo) when there is no GPU.

    A bare ``PartialState()`` on a machine without CUDA ignores the process group that
    ``accelerate launch`` set up and reports one process; ``cpu=True`` makes it join the group.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def close_distributed() -> None:
    """Destroy the default process group, if one was set up, before the interpreter exits.

    Without this, gloo's worker threads are still joinable when the process exits, and a rank
    can abort with "terminate called without an active exception" (SIGABRT) after its work is
    done: pytorch/pytorch#190489.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def worker_pool(n: int):
    """A ``ProcessPoolExecutor`` of ``n`` spawned workers sharing this process's torch threads
    (each gets ``torch.get_num_threads() // n``, at least 1).

    On Linux each worker dies with this process (``PR_SET_PDEATHSIG``): a sweep or build killed with
    SIGKILL leaves no writer behind to race the run that resumes it.
    """
    threads = max(1, torch.get_num_threads() // n)
    return ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_pool_worker,
                               initargs=(threads, os.getpid()))


def _init_pool_worker(threads: int, parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    quiet_libraries()
