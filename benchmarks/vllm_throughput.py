"""Throughput of plain vLLM vs vLLM with antidistillation (the composite model), and vs the HF path.

    python benchmarks/vllm_throughput.py                       # CPU shape: ~0.44B teacher, ~0.10B proxy, fp32
    python benchmarks/vllm_throughput.py --shape gpu            # 7B-like teacher, 1.5B-like proxy, bf16 (GPU)
    python benchmarks/vllm_throughput.py --concurrency 1 8 --max-tokens 16 --skip-hf

Random-weight models are built from configs (nothing is downloaded) and cached under ``--cache``.
Each level submits ``c`` requests at once (prompt ``--prompt-len`` random ids, ``--max-tokens``
new tokens each, EOS ignored, temperature τ) to one ``LLM.generate`` call and counts generated
tokens over its wall time (prefill included). The overhead is plain tok/s ÷ antidistillation tok/s,
reported against the FLOP bound 1 + 2·P_proxy/P_teacher (two proxy passes per teacher pass).
"HF" is ``model.generate`` with :class:`AntidistillationLogitsProcessor` on one static batch of ``c``.
"serve engine" is ``antidistill serve``'s own continuous-batching engine (per-request KV slots for the
teacher and the θ±εg proxies), driven in-process without HTTP: the same ``c`` requests submitted at once.
Prints a markdown table, the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

SHAPES = {
    # hidden, layers, heads, kv_heads, intermediate, vocab  (head_dim 64 throughout: vLLM CPU needs >= 32)
    "cpu": {"teacher": (1024, 24, 16, 16, 4096, 32000), "proxy": (576, 16, 9, 9, 2304, 32000), "dtype": "float32"},
    "gpu": {"teacher": (3584, 28, 28, 4, 18944, 152064), "proxy": (1536, 28, 12, 2, 8960, 152064), "dtype": "bfloat16"},
}
LAM, EPS, TAU = 0.3, 1e-2, 0.9


def build(cache: Path, shape: str):
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = SHAPES[shape]
    dtype = getattr(torch, spec["dtype"])
    out = {}
    for name, cls, cfg_cls in (("teacher", LlamaForCausalLM, LlamaConfig), ("proxy", Qwen2ForCausalLM, Qwen2Config)):
        d = cache / f"{shape}-{name}"
        h, n_layers, heads, kv, inter, vocab = spec[name]
        if not (d / "config.json").exists():
            torch.manual_seed(0)
            cfg = cfg_cls(hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv,
                          intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
            with torch.device("cpu"):
                m = cls(cfg).to(dtype)
            m.save_pretrained(d)
            if name == "proxy":
                gen = torch.Generator().manual_seed(1)
                g = {n: (torch.randn(p.shape, generator=gen) * 1e-3) for n, p in m.named_parameters()}
                save_file(g, str(cache / f"{shape}-g.safetensors"))
            del m
        cfgd = json.loads((d / "config.json").read_text())
        out[name] = str(d)
        out[f"P_{name}"] = params(cfgd)
    out["grad"] = str(cache / f"{shape}-g.safetensors")
    return out


def params(c: dict) -> int:
    h, n, i, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    attn = h * hd * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
    return n * (attn + 3 * h * i) + v * h  # tied embeddings counted once (the lm_head matmul)


def run_vllm(m: dict, lam: float, levels, prompt_len: int, max_tokens: int, shape: str, workdir: Path,
             kv_bytes=None) -> dict:
    from vllm import SamplingParams, TokensPrompt

    from antidistill.engines.vllm import VllmSettings, build_llm

    llm = build_llm(m["teacher"], m["proxy"] if lam else None, m["grad"] if lam else None,
                    settings=VllmSettings(lam=lam, eps=EPS, tau=TAU), workdir=workdir,
                    dtype=SHAPES[shape]["dtype"], max_num_seqs=max(levels), max_model_len=prompt_len + max_tokens + 8,
                    skip_tokenizer_init=True, kv_cache_memory_bytes=kv_bytes)
    import torch

    gen = torch.Generator().manual_seed(0)
    res = {}
    sp = SamplingParams(temperature=TAU, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    warm = [TokensPrompt(prompt_token_ids=torch.randint(3, 1000, (prompt_len,), generator=gen).tolist())]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    for c in levels:
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, 1000, (prompt_len,), generator=gen).tolist())
                   for _ in range(c)]
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        res[c] = sum(len(o.outputs[0].token_ids) for o in outs) / wall
        print(f"vllm lam={lam} c={c}: {res[c]:.1f} tok/s", flush=True)
    del llm
    gc.collect()
    return res


def run_hf(m: dict, levels, prompt_len: int, max_tokens: int) -> dict:
    import torch

    from antidistill.processor import AntidistillationLogitsProcessor
    from antidistill.proxy import load_causal_lm

    teacher = load_causal_lm(m["teacher"])
    proc = AntidistillationLogitsProcessor(m["proxy"], m["grad"], lam=LAM, eps=EPS, tau=TAU)
    gen = torch.Generator().manual_seed(0)
    res = {}
    for c in levels:
        ids = torch.randint(3, 1000, (c, prompt_len), generator=gen)
        proc.reset()
        t = time.perf_counter()
        with torch.no_grad():
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                   min_new_tokens=max_tokens, logits_processor=[proc], pad_token_id=0,
                                   **proc.generate_kwargs())
        wall = time.perf_counter() - t
        res[c] = (out.shape[1] - prompt_len) * c / wall
        print(f"hf c={c}: {res[c]:.1f} tok/s", flush=True)
    return res


class _NoText:
    """The benchmark's models have no tokenizer: token ids only, no EOS (every request runs to its end)."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def run_serve_engine(m: dict, levels, prompt_len: int, max_tokens: int) -> dict:
    import asyncio

    import torch

    from antidistill.proxy import load_causal_lm
    from antidistill.serve.engine import DoneEvent, Engine, GenRequest
    from antidistill.slots import SlotDelta

    teacher = load_causal_lm(m["teacher"])
    delta = SlotDelta(m["proxy"], m["grad"], eps=EPS, difference="central", pad_token_id=0)
    engine = Engine(teacher, _NoText(), delta, lam=LAM, tau=TAU, max_batch=max(levels), max_queue=max(levels))
    engine.start()
    gen = torch.Generator().manual_seed(0)

    async def level(c: int) -> float:
        loop = asyncio.get_running_loop()
        reqs = [GenRequest(prompt_ids=torch.randint(3, 1000, (prompt_len,), generator=gen).tolist(),
                           max_tokens=max_tokens, temperature=TAU, top_p=1.0, seed=i, logprobs=False, top_logprobs=0,
                           stop=[], loop=loop, out=asyncio.Queue()) for i in range(c)]
        t = time.perf_counter()
        for r in reqs:
            engine.submit(r)
        n = 0
        for r in reqs:
            while not isinstance(ev := await r.out.get(), DoneEvent):
                pass
            n += ev.completion_tokens
        return n / (time.perf_counter() - t)

    res = {}
    try:
        asyncio.run(level(1))  # warm-up
        for c in levels:
            res[c] = asyncio.run(level(c))
            print(f"serve engine c={c}: {res[c]:.1f} tok/s", flush=True)
    finally:
        engine.stop()
    return res


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=Path(".cache/antidistill/bench-vllm"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-serve-engine", action="store_true")
    ap.add_argument("--kv-gib", type=float, default=2.0,
                    help="KV cache on a CPU (enough that no level is KV-bound; 0: vLLM's GPU default)")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    m = build(args.cache, args.shape)
    bound = 1 + 2 * m["P_proxy"] / m["P_teacher"]
    kv = int(args.kv_gib * (1 << 30)) if args.kv_gib else None
    load0 = os.getloadavg()
    plain = run_vllm(m, 0.0, args.concurrency, args.prompt_len, args.max_tokens, args.shape, args.cache / "plain",
                     kv)
    ad = run_vllm(m, LAM, args.concurrency, args.prompt_len, args.max_tokens, args.shape, args.cache / "ad", kv)
    hf = {} if args.skip_hf else run_hf(m, args.concurrency, args.prompt_len, args.max_tokens)
    own = {} if args.skip_serve_engine else run_serve_engine(m, args.concurrency, args.prompt_len, args.max_tokens)
    load1 = os.getloadavg()
    print(f"\nCPU: {cpu_name()}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; "
          f"load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print(f"shape {args.shape}: teacher {m['P_teacher'] / 1e9:.3f}B, proxy {m['P_proxy'] / 1e9:.3f}B "
          f"({SHAPES[args.shape]['dtype']}); FLOP bound 1 + 2·P_proxy/P_teacher = {bound:.3f}; "
          f"prompt {args.prompt_len}, {args.max_tokens} new tokens per request\n")
    print("| concurrent | vLLM plain tok/s | vLLM antidistill tok/s | overhead | overhead / FLOP bound "
          "| HF antidistill tok/s | serve engine antidistill tok/s | vLLM / serve engine |")
    print("|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        ov = plain[c] / ad[c]
        h, e = hf.get(c), own.get(c)
        print(f"| {c} | {plain[c]:.1f} | {ad[c]:.1f} | {ov:.2f}× | {ov / bound:.2f} | "
              f"{'-' if h is None else f'{h:.1f}'} | {'-' if e is None else f'{e:.1f}'} | "
              f"{'-' if e is None else f'{ad[c] / e:.2f}×'} |")


if __name__ == "__main__":
    main()
