"""How much of one point's student accuracy is the distillation seed?

Usage: python benchmarks/seed_noise.py RUN_DIR POINT[,POINT...] SEED[,SEED...] [naive|harder] > out.jsonl
(run from the directory the run's config names its cache from; RUN_DIR a sweep's run directory with its
points' ``traces.jsonl``). Re-distils each point's committed traces with each seed, with the run's
``distill`` config (``naive``) or its ``harder`` distiller (as the run configures it, else ``--full``'s:
full fine-tuning, 3× the epochs, lr 1e-3), and scores the student as the sweep does: forced answers on the test split and NLL on the true
solutions. Prints one JSON line per (point, seed). ``docs/design.md`` ("How noisy one run is") has what
it measured.
"""
import json
import sys
import time
from pathlib import Path

import torch

from antidistill.config import load_config
from antidistill.experiment.distill import distill
from antidistill.experiment.distillers import harder_config
from antidistill.experiment.evaluate import accuracy_summary, solution_nll
from antidistill.experiment.materials import load_materials
from antidistill.experiment.sweepconfig import SweepConfig
from antidistill.generation import generate_traces
from antidistill.io_utils import read_jsonl
from antidistill.proxy import load_causal_lm

run, points, seeds = Path(sys.argv[1]), sys.argv[2].split(","), [int(s) for s in sys.argv[3].split(",")]
kind = sys.argv[4] if len(sys.argv) > 4 else "naive"
if kind not in ("naive", "harder"):
    raise SystemExit(f"distiller must be naive or harder, got {kind!r}")
torch.set_num_threads(1)
cfg = load_config(SweepConfig, str(run / "config.yaml"))
m = load_materials(cfg.dataset, world=cfg.world, cache_dir=cfg.cache_dir, data_path=cfg.data_path,
                   models={r: getattr(cfg, r) for r in ("teacher", "proxy", "student")}, limit_train=cfg.limit_train,
                   limit_test=cfg.limit_test, workers=1, progress=False, tokenizer_dirs=cfg.tokenizer_dirs)
tok = m.tokenizers["student"]
harder = next((d for d in cfg.distillers if d.kind == "harder"), None)  # the run's own settings, else full.yaml's
dcfg = (harder_config(cfg.distill, harder.epochs_factor, harder.lr) if harder else harder_config(cfg.distill, 3.0, 1e-3)
        ) if kind == "harder" else cfg.distill
greedy = cfg.settings_for("greedy", 0.0, 0)
for point in points:
    traces = read_jsonl(run / "points" / point / "traces.jsonl")
    for seed in seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        model, _ = distill(load_causal_lm(m.paths["student"]), tok, traces, dcfg,
                           output_dir=Path(f"/tmp/seed_noise/{point}_{kind}_{seed}"), eval_traces=None, seed=seed,
                           progress=False)
        acc = accuracy_summary(generate_traces(model, tok, m.splits["test"], greedy, progress=False,
                                               scoring="forced"))
        nll, _ = solution_nll(model, tok, m.splits["test"])
        print(json.dumps({"run": run.name, "point": point, "distiller": kind, "seed": seed,
                          "student_acc": acc["accuracy"], "student_test_nll": nll,
                          "seconds": round(time.time() - t0, 1)}), flush=True)
