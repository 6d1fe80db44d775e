"""Decode throughput of plain temperature sampling vs antidistillation in each difference mode.

Prints tokens/s, the overhead ratio against the FLOP bound 1 + k·ΣP_k/P_teacher (k = 2 for the
central and forward differences; k ≈ 3 for JVP, whose tangent pass turns each matmul W·x into
W·x, W·ẋ and Ẇ·x), and each mode's peak resident memory (each mode runs in a fresh subprocess).
The ``ensemble-*`` modes run a two-proxy ensemble (the proxy and a second, smaller one of its family,
weights 1:1): ΣP_k sums both proxies, so the central bound is 1 + 2·(P_1 + P_2)/P_teacher.

    python benchmarks/decode_overhead.py                 # tiny and realistic (0.5B teacher) shapes, CPU
    python benchmarks/decode_overhead.py --sizes tiny
    python benchmarks/decode_overhead.py --sizes gpu7b   # bf16 7B/3B shape on a CUDA GPU

Models are randomly initialised from configs; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {
    # teacher: Qwen2; proxy: Llama (different families, one vocabulary)
    "tiny": dict(vocab=512, teacher=(128, 4, 4, 384), proxy=(64, 2, 4, 192), proxy2=(48, 2, 4, 128), batch=8, new=64,
                 dtype="float32"),
    # Qwen2.5-0.5B-like teacher (494M with tied embeddings) and a ~0.12B proxy, both with a 151,936 vocabulary
    "realistic": dict(vocab=151936, teacher=(896, 24, 14, 4864), proxy=(512, 12, 8, 1536), proxy2=(384, 8, 6, 1024),
                      batch=4, new=24, dtype="float32"),
    "gpu7b": dict(vocab=152064, teacher=(3584, 28, 28, 18944), proxy=(2048, 36, 16, 11008),
                  proxy2=(1536, 28, 12, 8960), batch=8, new=128, dtype="bfloat16"),
}
MODES = ["temperature", "central", "forward", "jvp", "ensemble-central", "ensemble-forward", "ensemble-jvp"]
K = {"central": 2, "forward": 2, "jvp": 3}


def difference_of(mode: str) -> str:
    return mode.removeprefix("ensemble-")


def build(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    s = SIZES[size]
    device = "cuda" if size == "gpu7b" else "cpu"
    dtype = getattr(torch, s["dtype"])
    torch.manual_seed(0)
    h, n, heads, inter = s["teacher"]
    kv = 2 if size != "tiny" else heads
    tcfg = Qwen2Config(vocab_size=s["vocab"], hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=size != "gpu7b",
                       pad_token_id=0, eos_token_id=1)

    def proxy_config(shape):
        h, n, heads, inter = shape
        return LlamaConfig(vocab_size=s["vocab"], hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=max(1, heads // 4), intermediate_size=inter, tie_word_embeddings=True,
                           pad_token_id=0, eos_token_id=1)

    with torch.device(device):
        teacher = Qwen2ForCausalLM(tcfg).to(dtype).eval()
        proxies = [LlamaForCausalLM(proxy_config(s[k])).to(dtype).eval() for k in ("proxy", "proxy2")]
    return teacher, proxies, s, device


def run_mode(size: str, mode: str) -> dict:
    import resource

    import torch

    from antidistill import AntidistillationLogitsProcessor, generate

    teacher, proxies, s, device = build(size)
    if not mode.startswith("ensemble-"):
        proxies = proxies[:1]
    p_t = sum(p.numel() for p in teacher.parameters())
    p_p = sum(p.numel() for m in proxies for p in m.parameters()) if mode != "temperature" else 0
    sample = teacher.generate  # plain temperature sampling
    if mode != "temperature":
        grads = [{n: torch.randn_like(p) * 1e-3 for n, p in m.named_parameters()} for m in proxies]
        proc = AntidistillationLogitsProcessor(proxies if len(proxies) > 1 else proxies[0],
                                               grads if len(proxies) > 1 else grads[0], lam=0.1, eps=1e-2, tau=0.9,
                                               difference=difference_of(mode), pad_token_id=0)
        del grads

        def sample(*args, **kwargs):  # eq. 11: τ given once, to the processor
            return generate(teacher, *args, processor=proc, **kwargs)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, s["vocab"], (s["batch"], 32), generator=gen).to(device)
    kw = dict(do_sample=True, temperature=0.9, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        sample(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        sample(ids, max_new_tokens=s["new"], min_new_tokens=s["new"], **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"size": size, "mode": mode, "tokens_per_s": s["batch"] * s["new"] / dt, "seconds": dt,
            "p_teacher": p_t, "p_proxy": p_p, "peak_bytes": peak, "device": device, "dtype": s["dtype"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["tiny", "realistic"], choices=list(SIZES))
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(run_mode(*args._child)))
        return
    for size in args.sizes:
        results = {}
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--_child", size, mode], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if out.returncode != 0:
                print(f"{size}/{mode} failed:\n{out.stderr[-2000:]}")
                continue
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results.get("temperature")
        if not base:
            continue
        print(f"\n== {size}: teacher {base['p_teacher'] / 1e6:.2f}M, {base['device']} {base['dtype']}; "
              "bound = 1 + k·ΣP_k/P_teacher (k = 2 central/forward, 3 jvp)")
        print(f"{'mode':<18}{'ΣP_k':>9}{'tok/s':>10}{'overhead':>10}{'FLOP bound':>12}{'vs bound':>10}{'peak MiB':>10}")
        for mode, r in results.items():
            over = base["tokens_per_s"] / r["tokens_per_s"]
            bound = 1 + K.get(difference_of(mode), 0) * r["p_proxy"] / r["p_teacher"]
            print(f"{mode:<18}{r['p_proxy'] / 1e6:>8.2f}M{r['tokens_per_s']:>10.1f}{over:>10.2f}{bound:>12.2f}"
                  f"{over / bound:>10.2f}{r['peak_bytes'] / 2**20:>10.0f}")


if __name__ == "__main__":
    main()
