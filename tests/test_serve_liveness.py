"""Liveness, isolation and auth of the server: disconnects, a dead engine, SIGTERM, no teacher fallback,
continuous batching, and a key that fails closed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from antidistill.serve.config import ServeConfig
from antidistill.settings import Eq11Settings

from stepper import Stepper, client_left, wait_for
from test_serve import EPS, KEY, LAM, TAU, LiveServer, paths  # noqa: F401  (paths is a fixture)

H = {"Authorization": f"Bearer {KEY}"}
MODEL = "antidistill-teacher"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Ann has 3 apples ."}], "max_tokens": 200,
        "temperature": 1.0, "seed": 1}


@pytest.fixture(scope="module")
def one_slot(paths):
    """max_batch=1: one running request, the rest wait in the queue."""
    s = LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), api_key=KEY, max_tokens=200, max_batch=1))
    # precondition: the seeded LONG request really runs 200 tokens (no early end of sequence)
    r = httpx.post(s.url + "/v1/chat/completions", json=LONG, headers=H, timeout=120).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 200
    yield s
    s.close()


def test_nonstreaming_disconnect_frees_its_slot(one_slot):
    eng = one_slot.engine
    cancelled, tokens = eng.stats["cancelled"], eng.stats["tokens"]
    with Stepper(eng, budget=5) as st:
        with pytest.raises(httpx.ReadTimeout):  # the worker is held after 5 tokens: no answer can come
            httpx.post(one_slot.url + "/v1/chat/completions", json=LONG, headers=H, timeout=0.4)
        assert wait_for(lambda: client_left(eng))
        st.release()  # the next step sweeps the departed request
        assert wait_for(lambda: eng.stats["cancelled"] == cancelled + 1 and eng.running == 0)
    made = eng.stats["tokens"] - tokens
    time.sleep(0.3)
    assert eng.stats["tokens"] - tokens == made <= 5  # nothing more was generated for the departed client
    assert all(len(kv) == 0 for kv in eng.kvs)  # its KV slots (teacher and both proxies) are freed
    # the slot serves the next request at once
    r = httpx.post(one_slot.url + "/v1/chat/completions", json={**LONG, "max_tokens": 3}, headers=H, timeout=60)
    assert r.status_code == 200


def test_queued_request_leaves_the_queue_when_its_client_leaves(one_slot):
    eng = one_slot.engine
    with Stepper(eng, budget=1) as st, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, one_slot.url + "/v1/chat/completions", json=LONG, headers=H, timeout=120)
        assert st.wait_held() and eng.running == 1
        with pytest.raises(httpx.ReadTimeout):  # the one slot is busy and the worker is held
            httpx.post(one_slot.url + "/v1/chat/completions", json={**LONG, "seed": 2}, headers=H, timeout=0.5)
        # it leaves the queue while the worker is still held: at once, not when its turn comes
        assert wait_for(lambda: eng.queued == 0) and eng.running == 1 and st.parked
        st.release()
        assert busy.result().status_code == 200


def test_streaming_disconnect_stops_generation(one_slot):
    eng = one_slot.engine
    cancelled, tokens = eng.stats["cancelled"], eng.stats["tokens"]
    with Stepper(eng, budget=5) as st:
        with httpx.stream("POST", one_slot.url + "/v1/chat/completions", json={**LONG, "stream": True}, headers=H,
                          timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
        assert wait_for(lambda: client_left(eng))
        st.release()
        assert wait_for(lambda: eng.stats["cancelled"] == cancelled + 1 and eng.running == 0)
    assert eng.stats["tokens"] - tokens <= 5


def test_short_requests_do_not_wait_for_long_ones(paths):
    """Continuous batching: a 4-token request joins the running batch and leaves it after its own 4
    steps, while a 200-token one is still running; both decode in the same steps."""
    with LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), max_tokens=200, max_batch=8)) as s:
        eng = s.engine
        with Stepper(eng, budget=20) as st, ThreadPoolExecutor(2) as pool:
            long = pool.submit(httpx.post, s.url + "/v1/chat/completions", json=LONG, timeout=120)
            assert st.wait_held() and eng.stats["tokens"] == 20
            short = pool.submit(httpx.post, s.url + "/v1/chat/completions", json={**LONG, "max_tokens": 4, "seed": 5},
                                timeout=120)
            assert wait_for(lambda: eng.queued == 1)
            st.allow(1)  # one more step of the long request; the next iteration admits the short one
            assert st.wait_held() and eng.running == 2
            st.allow(4)
            r_short = short.result()
            assert r_short.status_code == 200 and r_short.json()["usage"]["completion_tokens"] <= 4
            assert st.wait_held() and not long.done() and eng.running == 1
            assert eng.stats["tokens"] == 21 + 4 + r_short.json()["usage"]["completion_tokens"]
            st.release()
            r = long.result()
        assert r.json()["usage"]["completion_tokens"] == 200
        assert eng.stats["max_running"] == 2


def test_seeded_output_does_not_depend_on_batch_mates(paths):
    with LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), max_tokens=32, max_batch=8)) as s:
        req = {**LONG, "max_tokens": 16, "seed": 123}
        alone = httpx.post(s.url + "/v1/chat/completions", json=req, timeout=60).json()["choices"][0]["message"]
        with ThreadPoolExecutor(6) as pool:
            others = [pool.submit(httpx.post, s.url + "/v1/chat/completions", json={**LONG, "max_tokens": 32, "seed": i},
                                  timeout=60) for i in range(5)]
            time.sleep(0.05)
            together = httpx.post(s.url + "/v1/chat/completions", json=req, timeout=60).json()["choices"][0]["message"]
            assert all(f.result().status_code == 200 for f in others)
        assert together == alone


def test_nonfinite_scores_end_the_request_never_the_teacher(paths):
    """λ = 1e38 overflows λΔ̂ to ±inf: the request ends with an error (plain and streamed), no token
    from the undefended teacher is returned, and the server stays up."""
    with LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=1e38, eps=EPS, tau=TAU), max_tokens=8)) as s:
        req = {**LONG, "max_tokens": 4, "logprobs": True, "top_logprobs": 5}
        r = httpx.post(s.url + "/v1/chat/completions", json=req, timeout=60)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "nonfinite_scores" and err["type"] == "server_error" and "choices" not in r.json()
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**req, "stream": True}, timeout=60) as st:
            events = [json.loads(x[6:]) for x in st.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "nonfinite_scores"
        assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
        assert not any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)
        assert s.engine.stats["tokens"] == 0
        assert httpx.get(s.url + "/health").status_code == 200


def test_dead_engine_turns_health_503_and_fails_waiting_requests(paths):
    with LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), max_tokens=200, max_batch=1)) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        with Stepper(s.engine, budget=3) as st, ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, s.url + "/v1/chat/completions", json=LONG, timeout=60)
            assert st.wait_held() and s.engine.running == 1
            waiting = pool.submit(httpx.post, s.url + "/v1/chat/completions", json={**LONG, "seed": 3}, timeout=60)
            assert wait_for(lambda: s.engine.queued == 1)

            def boom():
                raise RuntimeError("injected engine fault")
            s.engine._iteration = boom  # the worker's next step raises outside the per-request guards
            st.release()
            r1, r2 = running.result(), waiting.result()
        for r in (r1, r2):
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert "injected" not in r.text
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["error"]["type"] == "server_error"
        r3 = httpx.post(s.url + "/v1/chat/completions", json=LONG, timeout=10)
        assert r3.status_code == 503


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_sigterm_during_a_request_drains_and_exits(paths):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "antidistill.cli", "serve", "--teacher", paths["teacher"], "--proxy", paths["proxy"],
           "--grad", paths["grad"], "--lam", str(LAM), "--port", str(port), "--api-key", KEY,
           "--set", "drain_s=1", "--set", "max_tokens=10000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        # the bound only catches a hang: a process start under load can take minutes
        assert wait_for(lambda: up() or proc.poll() is not None, 600) and proc.poll() is None, \
            proc.stdout.read1().decode() if proc.poll() is not None else "no start"
        got, ended = [], threading.Event()

        def client():
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", headers=H, timeout=60,
                                  json={**LONG, "max_tokens": 5000, "stream": True}) as r:
                    for line in r.iter_lines():
                        got.append(line)
            except httpx.HTTPError:
                pass
            ended.set()

        th = threading.Thread(target=client, daemon=True)
        th.start()
        assert wait_for(lambda: len(got) > 5, 300)
        proc.send_signal(signal.SIGTERM)
        # drain_s=1 then exit, with a 5000-token stream in flight: the process ends (the bound only catches a
        # hang; without the drain it would run the stream to its end)
        rc = proc.wait(timeout=300)
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the status is -15
        out = proc.stdout.read().decode()
        assert rc in (0, -signal.SIGTERM) and "Finished server process" in out, out[-2000:]
        assert "Traceback" not in out and ended.wait(60)
        assert len(got) < 5000  # the stream was cut at the drain, not run to its end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- auth that fails closed --------------------------------------------------------------------
def test_auth_config_fails_closed():
    with pytest.raises(ValueError, match="empty"):
        ServeConfig(api_key="")
    with pytest.raises(ValueError, match="empty"):
        ServeConfig(api_key="   ")
    with pytest.raises(ValueError, match="insecure-no-auth"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", insecure_no_auth=True).api_key is None
    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"
    assert ServeConfig(host="::1").api_key is None  # loopback
    with pytest.raises(ValueError, match="jvp"):
        ServeConfig(sampling=Eq11Settings(lam=0.008, difference="jvp"))


def test_cli_rejects_an_empty_key(paths):
    from typer.testing import CliRunner

    from antidistill.cli import app

    r = CliRunner().invoke(app, ["serve", "--teacher", paths["teacher"], "--api-key", ""])
    assert r.exit_code == 2 and "empty" in r.output
    r = CliRunner().invoke(app, ["serve", "--teacher", paths["teacher"], "--host", "0.0.0.0", "--lam", "0"])
    assert r.exit_code == 2 and "insecure-no-auth" in r.output


def test_key_is_compared_in_constant_time_and_guards_the_schema(paths, monkeypatch):
    import secrets

    calls = []
    real = secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    with LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=0.0), api_key=KEY, docs=True)) as s:
        assert httpx.get(s.url + "/v1/models", headers=H).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert httpx.get(s.url + "/openapi.json").status_code == 401
        assert httpx.get(s.url + "/openapi.json", headers=H).json()["info"]["title"] == "antidistill"
        assert httpx.get(s.url + "/docs").status_code == 404
    assert len(calls) >= 3 and all(isinstance(a, bytes) for a, _ in calls)
