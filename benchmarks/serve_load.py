"""Server throughput and latency at several concurrencies, with and without antidistillation.

    python benchmarks/serve_load.py                  # toy-world teacher (built if missing)
    python benchmarks/serve_load.py --requests 64 --max-tokens 48

Each level sends ``--requests`` chat requests from ``c`` client threads over loopback with the
official openai client; tokens/s counts completion tokens over the level's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from antidistill.serve.config import ServeConfig
from antidistill.serve.live import LiveServer

QUESTION = "Ann has 7 apples . Ann buys 3 more . Ann gives away 2 apples . How many apples does Ann have now ?"


def level(server: LiveServer, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    client = server.client()

    def one(i):
        t = time.perf_counter()
        r = client.chat.completions.create(model=server.cfg.model_name, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=max_tokens, temperature=1.0, seed=i)
        return time.perf_counter() - t, r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat = sorted(x[0] for x in results)
    return {"concurrency": concurrency, "tokens_per_s": sum(x[1] for x in results) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--lam", type=float, default=0.007)
    args = ap.parse_args()
    for lam in (0.0, args.lam):
        cfg = ServeConfig(lam=lam, max_batch=32, max_queue=256, max_tokens=args.max_tokens)
        with LiveServer(cfg, progress=True) as server:
            server.client().chat.completions.create(model=cfg.model_name, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2)  # warm-up
            print(f"\n== {'antidistillation (λ=%g)' % lam if lam else 'plain teacher (λ=0)'}")
            print(f"{'clients':>8}{'tok/s':>10}{'p50 s':>8}{'p99 s':>8}")
            base = None
            for c in args.levels:
                r = level(server, c, max(args.requests, c), args.max_tokens)
                base = base or r["tokens_per_s"]
                print(f"{c:>8}{r['tokens_per_s']:>10.1f}{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}"
                      f"   ({r['tokens_per_s'] / base:.1f}× the 1-client rate)")


if __name__ == "__main__":
    main()
