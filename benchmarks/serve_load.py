"""Server throughput and latency under concurrent load, plain (λ = 0) and defended, from another process.

    python benchmarks/serve_load.py                         # models of the toy world's sizes, random weights
    python benchmarks/serve_load.py --max-tokens 32 --levels 1 8 16 32

The server runs in this process (uvicorn on 127.0.0.1, an ephemeral port). The load comes from a
separate process (``--drive``: asyncio + httpx, one connection per client), so clients never share
the server's GIL. Each level runs ``c`` closed-loop clients, each sending ``--per-client`` chat
requests back to back; tokens/s counts completion tokens over the level's wall time, latency is
per request. The mix runs ``c/2`` clients of long requests (``--long-tokens``) beside ``c/2`` of
short ones (``--short-tokens``) and compares the short requests' p99 with that of short requests
alone at the same client count (each short client sends 8 × ``--per-client`` requests, in both runs).

Models: unless ``--teacher/--proxy/--grad`` are given, a Llama teacher and a Qwen2 proxy of the
toy world's sizes (``ToyWorldConfig``: 128×3 and 64×2) with random weights and a random g, on the
toy tokenizer. Their end-of-sequence token is moved outside the model's vocabulary, so every
request runs to its ``max_tokens`` and all levels do the same work per request.

``--heavy``: an ordinary request (``--max-tokens``) alone, then beside one client that keeps the
heaviest request the serving policy allows running back to back (``max_tokens`` at the policy's cap,
``top_logprobs`` 20; the default policy, so n = 1 and one prompt), reported as the ordinary request's
p50/p99 latency and their ratio to unloaded. The over-limit request of issue 18 (``n`` = 16384,
``ignore_eos``) is sent first and must be refused with a 400 before any work.
Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "Ann has 7 apples . Ann buys 3 more . Ann gives away 2 apples . How many apples does Ann have now ?"


# --- the load generator (runs in its own process) ----------------------------------------------
async def _drive(url: str, key: str, clients: list[int], per_client: int, per_short: int) -> dict:
    import httpx

    body = {"model": "antidistill-teacher", "messages": [{"role": "user", "content": QUESTION}], "temperature": 1.0}
    results = []

    async def client(i: int, max_tokens: int):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
            for j in range(per_short if max_tokens == min(clients) else per_client):
                t = time.perf_counter()
                r = await c.post("/v1/chat/completions", json={**body, "max_tokens": max_tokens, "seed": i * 1000 + j})
                r.raise_for_status()
                results.append((max_tokens, time.perf_counter() - t, r.json()["usage"]["completion_tokens"]))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, m) for i, m in enumerate(clients)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "results": results}


async def _drive_heavy(url: str, key: str, n: int, max_tokens: int, heavy_tokens: int) -> dict:
    import httpx

    body = {"model": "antidistill-teacher", "messages": [{"role": "user", "content": QUESTION}], "temperature": 1.0}
    h = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=h, timeout=600) as c:
        over = await c.post("/v1/completions", json={"model": "antidistill-teacher", "prompt": QUESTION, "n": 16384,
                                                     "max_tokens": 200, "ignore_eos": True})

        async def ordinary() -> list[float]:
            lat = []
            for j in range(n):
                t = time.perf_counter()
                r = await c.post("/v1/chat/completions", json={**body, "max_tokens": max_tokens, "seed": j})
                r.raise_for_status()
                lat.append(time.perf_counter() - t)
            return lat

        alone = await ordinary()
        done, heavy_runs = asyncio.Event(), []

        async def heavy():
            async with httpx.AsyncClient(base_url=url, headers=h, timeout=600) as hc:
                while not done.is_set():
                    r = await hc.post("/v1/chat/completions", json={**body, "max_tokens": heavy_tokens, "seed": 99,
                                                                     "logprobs": True, "top_logprobs": 20})
                    heavy_runs.append(r.status_code)

        task = asyncio.create_task(heavy())
        await asyncio.sleep(0.5)  # let the heavy request reach the engine
        loaded = await ordinary()
        done.set()
        await task
    return {"over_limit_status": over.status_code, "over_limit_error": over.json().get("error", {}).get("message"),
            "alone": alone, "loaded": loaded, "heavy_runs": heavy_runs}


def heavy_row(args, paths) -> None:
    from antidistill.serve.config import ServeConfig
    from antidistill.serve.live import LiveServer
    from antidistill.settings import Eq11Settings

    cfg = ServeConfig(teacher=paths["teacher"], proxy=paths["proxy"], grad=paths["grad"],
                      sampling=Eq11Settings(lam=args.lam), api_key=args.key, torch_threads=args.threads)
    with LiveServer(cfg) as server:
        drive(server.url, args.key, [2], 2)  # warm-up
        out = subprocess.run([sys.executable, __file__, "--drive-heavy", server.url, "--key", args.key,
                              "--per-client", str(args.heavy_n), "--max-tokens", str(args.max_tokens)],
                             check=True, capture_output=True, text=True, timeout=3600)
    r = json.loads(out.stdout)

    def q(v, f):
        v = sorted(v)
        return v[min(len(v) - 1, round(f * (len(v) - 1)))]

    a, lo = r["alone"], r["loaded"]
    print(f"\nover-limit request (n=16384, ignore_eos): HTTP {r['over_limit_status']}: {r['over_limit_error']}")
    print(f"heavy requests completed while measuring: {len(r['heavy_runs'])} (statuses {sorted(set(r['heavy_runs']))}); "
          f"load average {os.getloadavg()}\n")
    print(f"| ordinary request ({args.max_tokens} tokens, defended λ = {args.lam:g}) | p50 s | p99 s |")
    print("|---|---|---|")
    print(f"| alone | {q(a, .5):.3f} | {q(a, .99):.3f} |")
    print(f"| beside one heavy request ({cfg.max_tokens} tokens, top_logprobs 20, back to back) | "
          f"{q(lo, .5):.3f} | {q(lo, .99):.3f} |")
    print(f"| ratio | {q(lo, .5) / q(a, .5):.2f} | {q(lo, .99) / q(a, .99):.2f} |")


def drive(url: str, key: str, clients: list[int], per_client: int, per_short: int | None = None) -> dict:
    """Run one level in a fresh process; returns its raw results. ``per_short``: requests per client
    for the clients with the smallest ``max_tokens`` (the short ones of a mix)."""
    out = subprocess.run([sys.executable, __file__, "--drive", url, "--key", key, "--per-client", str(per_client),
                          "--per-short", str(per_short or per_client), "--clients", *map(str, clients)],
                         check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout)


def summary(raw: dict, max_tokens: int | None = None) -> dict:
    rows = [r for r in raw["results"] if max_tokens is None or r[0] == max_tokens]
    lat = sorted(r[1] for r in rows)
    return {"tok_s": sum(r[2] for r in raw["results"]) / raw["wall"], "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))], "n": len(rows)}


# --- models ------------------------------------------------------------------------------------
def toy_models(root: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from antidistill.tokenizer_compat import load_tokenizer
    from antidistill.toyworld.build import ToyWorldConfig
    from antidistill.toyworld.models import build_model
    from antidistill.toyworld.task import generic_text, make_splits
    from antidistill.toyworld.tokenizer import build_tokenizer

    splits = make_splits(0, 200, 50)
    texts = [r["question"] + " " + r["solution"] for v in splits.values() for r in v] + generic_text(0, 200)
    build_tokenizer(texts, root / "tok")
    tok = load_tokenizer(root / "tok")
    world = ToyWorldConfig()
    teacher, proxy = build_model(world.teacher, tok, 1).eval(), build_model(world.proxy, tok, 2).eval()
    tok.add_special_tokens({"eos_token": "<|never|>"})  # id = vocab size: never sampled
    for name, m in (("teacher", teacher), ("proxy", proxy)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    gen = torch.Generator().manual_seed(0)
    grad = {n: torch.randn(p.shape, generator=gen) * 0.05 for n, p in proxy.named_parameters()}
    save_file(grad, str(root / "g.safetensors"))
    return {"teacher": str(root / "teacher"), "proxy": str(root / "proxy"), "grad": str(root / "g.safetensors"),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "proxy_params": sum(p.numel() for p in proxy.parameters())}


# --- the benchmark -----------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--short-tokens", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--mix-clients", type=int, default=16)
    ap.add_argument("--lam", type=float, default=0.008)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (tiny models: 1 beats 2 on 2 shared cores)")
    ap.add_argument("--teacher"), ap.add_argument("--proxy"), ap.add_argument("--grad")
    ap.add_argument("--drive"), ap.add_argument("--key", default="bench-key")
    ap.add_argument("--clients", nargs="+", type=int)
    ap.add_argument("--per-short", type=int)
    ap.add_argument("--heavy", action="store_true", help="only the ordinary-beside-heavy row (issue 18)")
    ap.add_argument("--heavy-n", type=int, default=20, help="ordinary requests per phase of --heavy")
    ap.add_argument("--drive-heavy")
    args = ap.parse_args()
    if args.drive_heavy:
        print(json.dumps(asyncio.run(_drive_heavy(args.drive_heavy, args.key, args.per_client, args.max_tokens, 256))))
        return
    if args.drive:
        print(json.dumps(asyncio.run(_drive(args.drive, args.key, args.clients, args.per_client,
                                            args.per_short or args.per_client))))
        return

    from antidistill.serve.config import ServeConfig
    from antidistill.settings import Eq11Settings
    from antidistill.serve.live import LiveServer

    tmp = tempfile.TemporaryDirectory()
    paths = ({"teacher": args.teacher, "proxy": args.proxy, "grad": args.grad} if args.teacher
             else toy_models(Path(tmp.name)))
    if args.heavy:
        return heavy_row(args, paths)
    if "teacher_params" in paths:
        print(f"models: teacher {paths['teacher_params'] / 1e6:.2f}M params (Llama 128x3), proxy "
              f"{paths['proxy_params'] / 1e6:.2f}M (Qwen2 64x2), random weights; server torch threads "
              f"{args.threads}, load {os.getloadavg()}")
    table = {}
    for lam in (0.0, args.lam):
        cfg = ServeConfig(teacher=paths["teacher"], proxy=paths["proxy"], grad=paths["grad"], sampling=Eq11Settings(lam=lam),
                          api_key=args.key, torch_threads=args.threads, max_batch=64, max_queue=256, max_tokens=max(args.long_tokens, args.max_tokens))
        with LiveServer(cfg) as server:
            drive(server.url, args.key, [2], 2)  # warm-up
            for c in args.levels:
                table[(lam, c)] = summary(drive(server.url, args.key, [args.max_tokens] * c, args.per_client))
                print(f"λ={lam:g} clients={c}: {table[(lam, c)]}", file=sys.stderr)
            half = args.mix_clients // 2
            n_short = 8 * args.per_client  # per short client, alone and in the mix: enough samples for a p99
            table[(lam, "short")] = summary(drive(server.url, args.key, [args.short_tokens] * half, n_short))
            mixed = drive(server.url, args.key, [args.long_tokens] * half + [args.short_tokens] * half, args.per_client,
                          n_short)
            table[(lam, "mix-short")] = summary(mixed, args.short_tokens)
            table[(lam, "mix-long")] = summary(mixed, args.long_tokens)
            print(f"λ={lam:g} mix: {table[(lam, 'short')]} {table[(lam, 'mix-short')]}", file=sys.stderr)
    print(f"\nload average at the end: {os.getloadavg()}\n")
    print(f"| clients | plain tok/s | p50 / p99 s | defended (λ = {args.lam:g}) tok/s | p50 / p99 s |")
    print("|---|---|---|---|---|")
    for c in args.levels:
        p, d = table[(0.0, c)], table[(args.lam, c)]
        p1, d1 = table[(0.0, args.levels[0])], table[(args.lam, args.levels[0])]
        print(f"| {c} | {p['tok_s']:.0f} ({p['tok_s'] / p1['tok_s']:.1f}×) | {p['p50']:.2f} / {p['p99']:.2f} "
              f"| {d['tok_s']:.0f} ({d['tok_s'] / d1['tok_s']:.1f}×) | {d['p50']:.2f} / {d['p99']:.2f} |")
    print(f"\nShort ({args.short_tokens}-token) requests, {args.mix_clients // 2} clients, alone and beside "
          f"{args.mix_clients // 2} clients of {args.long_tokens}-token requests:\n")
    print("| mode | short alone p50 / p99 s | short in mix p50 / p99 s | p99 ratio | long in mix p50 / p99 s |")
    print("|---|---|---|---|---|")
    for lam in (0.0, args.lam):
        a, m, lg = table[(lam, "short")], table[(lam, "mix-short")], table[(lam, "mix-long")]
        name = "plain" if lam == 0 else f"defended (λ = {lam:g})"
        print(f"| {name} | {a['p50']:.3f} / {a['p99']:.3f} | {m['p50']:.3f} / {m['p99']:.3f} | "
              f"{m['p99'] / a['p99']:.2f} | {lg['p50']:.2f} / {lg['p99']:.2f} |")


if __name__ == "__main__":
    main()
