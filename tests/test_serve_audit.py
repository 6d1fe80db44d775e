"""Adversarial audit of the embedded server (a hostile client with a valid key, and one without).

Each test is one attack; the ones that broke the server first are marked so in their docstring.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import torch

from antidistill.serve.config import ServeConfig
from antidistill.settings import Eq11Settings
from antidistill.tokenizer_compat import load_tokenizer

from helpers_world import tiny
from test_serve import EPS, KEY, LAM, TAU, LiveServer, paths  # noqa: F401  (paths is a fixture)

H = {"Authorization": f"Bearer {KEY}"}
MODEL = "antidistill-teacher"
PROMPT = "Ann has 3 apples . Ann buys 2 more . How many apples does Ann have now ?"
BODY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(paths):
    s = LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), api_key=KEY, max_tokens=16,
                               max_prompt_tokens=200, max_batch=8, max_queue=16, body_timeout_s=BODY_TIMEOUT))
    yield s
    s.close()


def _raw(server, data: bytes, wait: float) -> bytes:
    """Send raw bytes on a fresh connection; whatever comes back within ``wait`` seconds."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        got, deadline = b"", time.time() + wait
        while time.time() < deadline:
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        return got


def test_slow_body_is_cut_off_before_auth_or_work(server):
    """Broke: a client (no key needed: the body is read before auth) that sends headers and then a
    trickle of body held its connection forever; enough of them fill uvicorn's connection limit
    (``serve_forever``'s limit_concurrency) and every other request gets 503. Now the whole body must
    arrive within ``body_timeout_s``, or the answer is 408 and the connection closes."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{")
    got = _raw(server, head, wait=300)  # the bound only catches a hang: the server answers and closes
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b'"error"' in got and b"Traceback" not in got
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_trailing_slash_is_not_an_open_redirect(server):
    """Broke: ``GET /v1/models/`` (no key) answered 307 to ``http://<Host header>/v1/models``, an open
    redirect to any host the client names. Now it is a 404 like any unknown route."""
    r = httpx.get(server.url + "/v1/models/", headers={"Host": "evil.example"}, follow_redirects=False, timeout=10)
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["type"] == "not_found_error"


def test_echo_with_logprobs_gives_no_prompt_logprobs(server):
    """Held: ``echo`` + ``logprobs`` returns logprobs of generated tokens only (prompt-token logprobs
    would be the raw teacher's, there being no Δ̂ for forced tokens)."""
    r = httpx.post(server.url + "/v1/completions", headers=H, timeout=60,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 5, "seed": 1})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["text"].startswith(PROMPT)
    assert len(c["logprobs"]["token_logprobs"]) == r.json()["usage"]["completion_tokens"] <= 3
    assert c["logprobs"]["text_offset"][0] == len(PROMPT)


def test_top_p_does_not_separate_the_teacher(server, paths):
    """Held: the nucleus is cut from the flattened q and renormalised, which only shifts log q by a
    constant; the log-odds inside any nucleus, at any T, are c_T·(z odds). Combining responses at
    several (T, top_p) recovers the raw teacher's log-odds no better than one response does."""
    tok = load_tokenizer(paths["teacher"])
    teacher = tiny("llama", tok, seed=1)
    by_text = {tok.decode([i]): i for i in range(len(tok))}
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, -1].double(), -1)
    tops = []
    for t, p in ((0.0, 1.0), (2.0, 1.0), (0.5, 0.97), (1.5, 0.95)):
        r = httpx.post(server.url + "/v1/completions", headers=H, timeout=60, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 1, "logprobs": 5, "temperature": t, "top_p": p, "seed": 0})
        assert r.status_code == 200, r.text
        tops.append({k: v for k, v in r.json()["choices"][0]["logprobs"]["top_logprobs"][0].items() if v > -9999})
    common = [s for s in tops[0] if all(s in q for q in tops)]
    assert len(common) >= 2
    ref, rest = common[0], common[1:]
    truth = torch.tensor([float(lp[by_text[s]] - lp[by_text[ref]]) for s in rest], dtype=torch.float64)
    cols = torch.tensor([[q[s] - q[ref] for q in tops] for s in rest], dtype=torch.float64)
    # every response is proportional to the first: the columns span one direction (z's) ...
    for j in range(1, cols.shape[1]):
        a = float(cols[:, j] @ cols[:, 0] / (cols[:, 0] @ cols[:, 0]))
        assert float((cols[:, j] - a * cols[:, 0]).abs().max()) < 1e-4
    # ... so the best combination of all four is no closer to the teacher than the best multiple of one
    one = float((float(cols[:, 0] @ truth / (cols[:, 0] @ cols[:, 0])) * cols[:, 0] - truth).norm())
    coef = torch.linalg.lstsq(cols, truth[:, None], rcond=1e-4, driver="gelsd").solution
    assert float((cols @ coef[:, 0] - truth).norm()) >= one - 1e-4


def test_tiny_top_p_is_not_greedy_decoding(server):
    """A top_p of 1e-9 would keep only the argmax of q: greedy eq. 11, the near-clean trace that
    temperature 0 is kept from giving. A request's top_p is raised to the operator's floor
    (``min_top_p``, 1 by default), so the tiny nucleus samples q whole, with q's own logprobs."""
    def top(top_p):
        r = httpx.post(server.url + "/v1/completions", headers=H, timeout=60, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 1, "logprobs": 5, "temperature": 0, "top_p": top_p,
            "seed": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["top_logprobs"][0]

    tiny_p, whole = top(1e-9), top(1.0)
    assert tiny_p == whole
    assert sum(v > -9999 for v in tiny_p.values()) == 5  # five tokens with finite probability, not one
