"""Pilot: which lever makes toy students learn from the teacher (greedy-trace student ≥ 45%, slope ≥ 0.2)?

Usage: python benchmarks/distill_levers.py WORLD_ROOT VARIANT TAU [N_TRACES [N_TEST]]
(WORLD_ROOT: a built toy world's folder; docs/results/tuning.md has what it measured).
Generates teacher traces on train at τ (0 = greedy), distils the base student with the variant, and
evaluates it on the test split (forced scoring). Prints one JSON line.
"""
import json, sys, time, dataclasses
from pathlib import Path
import torch
from antidistill.experiment.distill import DistillConfig, distill
from antidistill.generation import generate_traces
from antidistill.experiment.evaluate import accuracy_summary
from antidistill.io_utils import read_jsonl, write_jsonl
from antidistill.proxy import load_causal_lm
from antidistill.settings import SamplingSettings
from antidistill.tokenizer_compat import load_tokenizer

root, variant, tau = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else None
n_test = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
torch.set_num_threads(1)
tok = load_tokenizer(root / "teacher")
train = read_jsonl(root / "data" / "train.jsonl")[:n]
test = read_jsonl(root / "data" / "test.jsonl")[:n_test]
cache = root / f"pilot_traces_{tau:g}_{len(train)}.jsonl"
t0 = time.time()
if cache.exists():
    traces = read_jsonl(cache)
else:
    s = SamplingSettings(method="greedy" if tau == 0 else "temperature", tau=tau if tau > 0 else 1.0, top_p=0.95,
                         max_new_tokens=80, batch_size=128, seed=0)
    traces = generate_traces(load_causal_lm(str(root / "teacher")), tok, train, s, progress=False)
    write_jsonl(cache, traces)
t_gen = time.time() - t0
variants = {
    "lora4": DistillConfig(epochs=4.0),
    "lora8": DistillConfig(epochs=8.0),
    "full2": DistillConfig(lora=False, lr=1e-3, epochs=2.0),
    "full4": DistillConfig(lora=False, lr=1e-3, epochs=4.0),
    "full4_5e4": DistillConfig(lora=False, lr=5e-4, epochs=4.0),
    "lora2": DistillConfig(epochs=2.0),
}
cfg = dataclasses.replace(variants[variant], batch_size=32) if variant.startswith("full") else variants[variant]
t0 = time.time()
model, hist = distill(load_causal_lm(str(root / "student")), tok, traces, cfg, output_dir=root / f".pilot_{variant}_{tau:g}", seed=0)
t_dist = time.time() - t0
t0 = time.time()
g = SamplingSettings(method="greedy", max_new_tokens=80, batch_size=256)
rows = generate_traces(model, tok, test, g, progress=False, scoring="forced")
t_eval = time.time() - t0
print(json.dumps({"variant": variant, "tau": tau, "n_traces": len(traces), "teacher_acc": accuracy_summary(traces)["accuracy"],
                  "student_acc": accuracy_summary(rows)["accuracy"], "n_test": len(rows),
                  "t_gen": round(t_gen, 1), "t_distill": round(t_dist, 1), "t_eval": round(t_eval, 1)}), flush=True)
