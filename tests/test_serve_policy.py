"""Issue 18 on the embedded server: the one request policy, bounded work, connections that idle clients cannot
exhaust, OpenAI stop semantics and incremental detokenization off the model thread. No test assumes how fast
a token or a connection is: the engine is held with :class:`stepper.Stepper`, and the server's own timeouts
are waited for as events."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from antidistill.serve.config import ServeConfig
from antidistill.serve.detok import TextStream
from antidistill.serving_policy import PolicyError, ServingPolicy
from antidistill.settings import Eq11Settings
from antidistill.tokenizer_compat import load_tokenizer

from helpers_world import toy_tokenizer_dir
from stepper import Stepper
from test_serve import EPS, KEY, LAM, TAU, LiveServer, paths  # noqa: F401  (paths is a fixture)

H = {"Authorization": f"Bearer {KEY}"}
MODEL = "antidistill-teacher"
PROMPT = "Ann has 3 apples . Ann buys 2 more . How many apples does Ann have now ?"


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], **kw}


# --- the policy object, as data ---------------------------------------------------------------------
def test_policy_bounds_work_before_any_work():
    p = ServingPolicy(max_tokens=64, max_n=4, max_prompts=4, max_work_tokens=512)
    assert p.check(chat_body(max_tokens=1000), "chat").max_tokens == 64  # capped, not refused
    w = p.check({"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 64}, "completions")
    assert (w.prompts, w.n, w.max_tokens, w.tokens) == (2, 2, 64, 256)
    with pytest.raises(PolicyError, match="max_work_tokens=512") as e:  # 2 x 2 x 64 x (1 + 1 + 5)
        p.check({"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 64, "logprobs": 5}, "completions")
    assert e.value.code == "work_limit_exceeded"
    with pytest.raises(PolicyError, match="max_n=4"):
        p.check({"model": MODEL, "prompt": "a", "n": 16384}, "completions")
    with pytest.raises(PolicyError, match="max_n=4"):
        p.check({"model": MODEL, "prompt": "a", "best_of": 5}, "completions")
    with pytest.raises(PolicyError, match="max_prompts=4"):
        p.check({"model": MODEL, "prompt": ["a"] * 5}, "completions")
    with pytest.raises(PolicyError, match="token-id"):
        p.check({"model": MODEL, "prompt": [1, 2, 3]}, "completions")
    # the default: one request at the token cap with full logprobs, nothing bigger
    d = ServingPolicy()
    d.check(chat_body(max_tokens=256, logprobs=True, top_logprobs=20), "chat")
    with pytest.raises(PolicyError, match="max_n=1"):
        d.check(chat_body(n=2), "chat")


@pytest.mark.parametrize("extra, needle", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "function", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"response_format": {"type": "json_object"}}, "structured output"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "structured output"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"allowed_token_ids": [5]}, "allowed_token_ids"),
    ({"tau": 0.1}, "operator-only"),
    ({"stop": ["a"] * 5}, "max_stop"),
    ({"temperature": 3.0}, "temperature"),
])
def test_policy_refuses(extra, needle):
    with pytest.raises(PolicyError, match=needle):
        ServingPolicy().check(chat_body(**extra), "chat")


def test_policy_normalises_roles_and_text_parts():
    w = ServingPolicy().check(chat_body(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                                  {"role": "user", "content": "b"}]), "chat")
    assert w.messages == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="nonfinite"):
        ServingPolicy(nonfinite="teacher")
    with pytest.raises(ValueError, match="max_work_tokens"):
        ServeConfig(max_tokens=100, max_work_tokens=10)


# --- incremental detokenization and stop semantics, unit ----------------------------------------------
def test_text_stream_is_incremental_and_applies_stop_strings(tmp_path):
    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    ids = tok(PROMPT + " " + PROMPT, add_special_tokens=False)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    ts = TextStream(tok)
    assert "".join(ts.push(i) for i in ids) + ts.flush() == full
    stop = "buys 2"  # spans several tokens: held back, never half-returned
    ts = TextStream(tok, [stop])
    pieces = [ts.push(i) for i in ids]
    assert ts.stopped and "".join(pieces) == full[: full.index(stop)]
    assert all(stop[:3] not in p for p in pieces)


# --- the live server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(paths):
    s = LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), api_key=KEY,
                               max_tokens=48, max_prompt_tokens=200, max_batch=4, max_queue=8))
    yield s
    s.close()


def post(server, body, path="/v1/chat/completions", timeout=120):
    return httpx.post(server.url + path, json=body, headers=H, timeout=timeout)


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/chat/completions", chat_body(n=2), "max_n=1"),
    ("/v1/completions", {"model": MODEL, "prompt": [PROMPT, PROMPT]}, "max_prompts=1"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "tool", "content": "x"}]), "role"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_object"}), "structured output"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
])
def test_policy_400s_on_the_embedded_server(server, path, body, needle):
    tokens = server.engine.stats["rows"]
    r = post(server, body, path)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    assert needle in r.json()["error"]["message"]
    assert server.engine.stats["rows"] == tokens  # refused before any work


def test_stop_string_is_not_returned(server):
    """OpenAI semantics: the text ends just before the stop string, streamed or not (the old engine returned it)."""
    base = chat_body(max_tokens=48, temperature=1.0, seed=7)
    full = post(server, base).json()["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[len(words) // 2]
    want = full[: full.index(stop)]
    r = post(server, {**base, "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**base, "stop": stop, "stream": True},
                      headers=H, timeout=120) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    c = post(server, {"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 1.0, "seed": 7},
             "/v1/completions").json()["choices"][0]["text"]
    cw = c.split()
    if len(cw) >= 4:
        cstop = " " + cw[len(cw) // 2]
        r = post(server, {"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 1.0, "seed": 7,
                          "stop": cstop}, "/v1/completions").json()["choices"][0]
        assert r["text"] == c[: c.index(cstop)] and r["finish_reason"] == "stop"


def test_no_decoding_on_the_model_thread(server, monkeypatch):
    """Text is decoded by the handler, incrementally; the engine thread never calls the tokenizer's decode
    (it used to re-decode the whole output at every token there)."""
    tok = server.engine.tok
    threads = []
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k))
    r = post(server, chat_body(max_tokens=16, temperature=1.0, seed=3, logprobs=True, top_logprobs=2))
    assert r.status_code == 200
    assert threads and not any(t.startswith("antidistill-engine") for t in threads)


# --- connections -----------------------------------------------------------------------------------------
def _idle_sockets(port, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
    return socks


def test_idle_connections_cannot_lock_out_keyed_clients(paths):
    """170 idle TCP connections, no key and no bytes, used to make the server answer every client 503
    text/plain, /health included (uvicorn's limit_concurrency counts idle connections)."""
    cfg = ServeConfig(**paths, sampling=Eq11Settings(lam=0.0), api_key=KEY, max_tokens=4, max_batch=2, max_queue=4,
                      max_connections_per_client=32, max_connections=64)
    with LiveServer(cfg) as s:
        socks = _idle_sockets(s.port, 170)
        try:
            h = httpx.get(s.url + "/health", timeout=60)
            assert h.status_code == 200 and h.headers["content-type"].startswith("application/json")
            r = httpx.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=H, timeout=60)
            assert r.status_code == 200, r.text
            reg = s.server.config.http_protocol_class.connections_registry
            assert reg.stats["evicted"] >= 170 - 32 and len(reg.all) <= 32
        finally:
            for k in socks:
                k.close()


def test_incomplete_headers_time_out_with_json(paths):
    cfg = ServeConfig(**paths, sampling=Eq11Settings(lam=0.0), api_key=KEY, max_tokens=4, header_timeout_s=0.5)
    with LiveServer(cfg) as s:
        sk = socket.create_connection(("127.0.0.1", s.port))
        sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        sk.settimeout(60)  # bounds a hang only: the server's own 0.5 s timeout is what ends it
        data = b""
        while chunk := sk.recv(4096):
            data += chunk
        sk.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"application/json" in head
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert s.server.config.http_protocol_class.connections_registry.stats["header_timeouts"] == 1


def test_overload_is_json_503_with_retry_after_and_health_answers(paths):
    cfg = ServeConfig(**paths, sampling=Eq11Settings(lam=0.0), api_key=KEY, max_tokens=8, max_requests=1,
                      retry_after_s=3)
    with LiveServer(cfg) as s, Stepper(s.engine, budget=1) as st, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, s.url + "/v1/chat/completions", json=chat_body(max_tokens=8), headers=H,
                           timeout=120)
        assert st.wait_held()  # one request in flight, held by the engine
        r = httpx.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=H, timeout=60)
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
        assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "server_busy"
        assert httpx.get(s.url + "/health", timeout=60).status_code == 200
        st.release()
        assert busy.result().status_code == 200
