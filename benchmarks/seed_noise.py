"""How much of one point's student accuracy is the distillation seed?

Usage: python benchmarks/seed_noise.py RUN_DIR POINT[,POINT...] SEED[,SEED...] [naive|harder]
[--student NAME --zoo-config CONFIG] [--epochs-factor F] > out.jsonl
(run from the directory the run's config names its cache from; RUN_DIR a sweep's run directory with its
points' ``traces.jsonl``). ``--student`` distils into a zoo panel student instead of the base student: the
world's zoo is taken from CONFIG (e.g. ``src/antidistill/configs/transfer.yaml``), built beside the cached
world if it is not yet, under the key the transfer run will use. Re-distils each point's committed traces with each seed, with the run's
``distill`` config (``naive``) or its ``harder`` distiller (as the run configures it, else ``--full``'s:
full fine-tuning, 3× the epochs, lr 1e-3; ``--epochs-factor`` sets another multiple), and scores the student as the sweep does: forced answers on the test split and NLL on the true
solutions. Prints one JSON line per (point, seed). ``docs/design.md`` ("How noisy one run is") has what
it measured.
"""
import argparse
import dataclasses
import json
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

parser = argparse.ArgumentParser(description="Re-distil committed traces with other seeds.")
parser.add_argument("run", type=Path)
parser.add_argument("points")
parser.add_argument("seeds")
parser.add_argument("kind", nargs="?", default="naive", choices=("naive", "harder"))
parser.add_argument("--student", default=None, help="a zoo panel student (default: the base student)")
parser.add_argument("--zoo-config", type=Path, default=None, help="the sweep config whose world.zoo to use")
parser.add_argument("--epochs-factor", type=float, default=None,
                    help="with harder: this multiple of the run's epochs instead of the harder distiller's")
args = parser.parse_args()
run, points, seeds, kind = args.run, args.points.split(","), [int(s) for s in args.seeds.split(",")], args.kind
if (args.student is None) != (args.zoo_config is None):
    parser.error("--student and --zoo-config go together")
if args.epochs_factor is not None and (kind != "harder" or args.epochs_factor <= 0):
    parser.error("--epochs-factor needs the harder kind and a positive factor")
torch.set_num_threads(1)
cfg = load_config(SweepConfig, str(run / "config.yaml"))
world = cfg.world
if args.zoo_config is not None:
    zoo = load_config(SweepConfig, str(args.zoo_config)).world.zoo
    if zoo is None or args.student not in zoo.panel:
        parser.error(f"{args.zoo_config}: no panel student {args.student!r} in its world.zoo")
    world = dataclasses.replace(world, zoo=zoo)
m = load_materials(cfg.dataset, world=world, cache_dir=cfg.cache_dir, data_path=cfg.data_path,
                   models={r: getattr(cfg, r) for r in ("teacher", "proxy", "student")}, limit_train=cfg.limit_train,
                   limit_test=cfg.limit_test, workers=1, progress=False, tokenizer_dirs=cfg.tokenizer_dirs)
tok = m.tokenizers["student"]  # the world's one tokenizer: every panel student shares it
student_path = m.paths["student"] if args.student is None else m.named_paths[args.student]
tag = kind if args.student is None else f"{kind}_{args.student}"  # names the scratch output folder
harder = next((d for d in cfg.distillers if d.kind == "harder"), None)  # the run's own settings, else full.yaml's
factor, lr = (harder.epochs_factor, harder.lr) if harder else (3.0, 1e-3)
factor = factor if args.epochs_factor is None else args.epochs_factor
dcfg = harder_config(cfg.distill, factor, lr) if kind == "harder" else cfg.distill
if args.epochs_factor is not None:
    tag = f"{tag}_x{factor:g}"
greedy = cfg.settings_for("greedy", 0.0, 0)
for point in points:
    traces = read_jsonl(run / "points" / point / "traces.jsonl")
    for seed in seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        model, _ = distill(load_causal_lm(student_path), tok, traces, dcfg,
                           output_dir=Path(f"/tmp/seed_noise/{point}_{tag}_{seed}"), eval_traces=None, seed=seed,
                           progress=False)
        acc = accuracy_summary(generate_traces(model, tok, m.splits["test"], greedy, progress=False,
                                               scoring="forced"))
        nll, _ = solution_nll(model, tok, m.splits["test"])
        print(json.dumps({"run": run.name, "point": point, "distiller": kind, "seed": seed,
                          **({} if args.epochs_factor is None else {"epochs_factor": factor}),
                          **({} if args.student is None else {"student": args.student}),
                          "student_acc": acc["accuracy"], "student_test_nll": nll,
                          "seconds": round(time.time() - t0, 1)}), flush=True)
