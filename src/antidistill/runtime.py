"""Process-level setup: accelerate's distributed state, spawned worker pools and quiet library logs.

The package's ``__init__`` never imports this module, so ``import antidistill`` loads neither
accelerate nor datasets; commands, the experiment and the trace generator do.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor

import datasets
import torch
import torch.distributed as dist
import transformers
from accelerate import PartialState


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


def quiet_libraries() -> None:
    """Silence per-call progress bars and info logs of transformers, datasets and math-verify.

    Our own rich progress bars say what is happening; the libraries' would repeat it per model load
    and per distillation.
    """
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("math_verify", "latex2sympy2_extended", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
