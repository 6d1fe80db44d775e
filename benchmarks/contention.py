"""How much a busy neighbour slows ``antidistill demo --quick`` (issue: contention on 2 cores).

Runs the quick demo from an empty cache, alone and beside N busy processes (pure-Python spin loops),
under each OpenMP wait policy asked for, and prints wall times and slowdowns. The machine's other load
is printed with each row; run it on an otherwise quiet machine.

    python benchmarks/contention.py --busy 1 --policies PASSIVE ACTIVE
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spin() -> None:
    while True:
        pass


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def quick_demo_seconds(policy: str, timeout: float) -> float:
    """Wall time of one ``demo --quick`` from an empty cache, with ``OMP_WAIT_POLICY=policy``."""
    root = Path(tempfile.mkdtemp(prefix="contention-"))
    env = os.environ | {"OMP_WAIT_POLICY": policy}
    cmd = [sys.executable, "-m", "antidistill.cli", "demo", "--quick", "--set", f"runs_dir={root}/runs",
           "--set", f"cache_dir={root}/cache"]
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=1, help="busy processes beside the run")
    ap.add_argument("--policies", nargs="+", default=["PASSIVE", "ACTIVE"])
    ap.add_argument("--timeout", type=float, default=600.0, help="give up on one run after this many seconds")
    args = ap.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f}")
    print("| OpenMP wait policy | alone (s) | beside %d busy (s) | slowdown |" % args.busy)
    print("|---|---|---|---|")
    for policy in args.policies:
        alone = quick_demo_seconds(policy, args.timeout)
        spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.busy)]
        for p in spinners:
            p.start()
        try:
            beside = quick_demo_seconds(policy, args.timeout)
        finally:
            for p in spinners:
                p.terminate()
        print(f"| {policy} | {alone:.1f} | {beside:.1f} | {beside / alone:.1f}x |  (load {os.getloadavg()[0]:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
