"""The real server on a loopback ephemeral port, driven by the official openai client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from antidistill.processor import AntidistillationLogitsProcessor
from antidistill.serve.config import ServeConfig
from antidistill.settings import Eq11Settings
from antidistill.serve.live import LiveServer as _LiveServer
from antidistill.tokenizer_compat import load_tokenizer

from conftest import random_grad
from helpers_world import tiny, toy_tokenizer_dir

KEY = "test-key"
LAM, EPS, TAU = 0.5, 1e-2, 0.9


class LiveServer(_LiveServer):
    def client(self, key=KEY, **kw):
        return super().client(key=key, **kw)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = load_tokenizer(toy_tokenizer_dir(str(root)))
    teacher, proxy = tiny("llama", tok, seed=1), tiny("qwen2", tok, seed=2)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    proxy.save_pretrained(root / "proxy")
    tok.save_pretrained(root / "proxy")
    save_file(random_grad(proxy, scale=0.5), str(root / "g.safetensors"))
    return {"teacher": str(root / "teacher"), "proxy": str(root / "proxy"), "grad": str(root / "g.safetensors")}


@pytest.fixture(scope="module")
def server(paths):
    s = LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), api_key=KEY, max_tokens=64, max_prompt_tokens=200,
                               max_batch=16, max_queue=64))
    yield s
    s.close()


def chat(client, content="Ann has 3 apples . Ann buys 2 more . How many apples does Ann have now ?", **kw):
    return client.chat.completions.create(model="antidistill-teacher", messages=[{"role": "user", "content": content}], **kw)


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["antidistillation"] is True
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["antidistill-teacher"]


def test_chat_nonstreaming_and_streaming_agree(server):
    c = server.client()
    r = chat(c, max_tokens=12, temperature=0, seed=3)  # temperature 0 samples q (seeded), it is not greedy
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    stream = chat(c, max_tokens=12, temperature=0, seed=3, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(pieces) == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason


def test_seeded_sampling_is_reproducible(server):
    c = server.client()
    a = chat(c, max_tokens=10, temperature=1.0, seed=7).choices[0].message.content
    b = chat(c, max_tokens=10, temperature=1.0, seed=7).choices[0].message.content
    assert a == b


def test_completions(server):
    r = server.client().completions.create(model="antidistill-teacher", prompt="Ann has 3 apples .", max_tokens=5,
                                           temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 5


def test_auth(server):
    rows = server.engine.stats["rows"]
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(key="wrong"), max_tokens=2)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "antidistill-teacher",
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert server.engine.stats["rows"] == rows  # no work was done


@pytest.mark.parametrize(
    "body, needle",
    [
        ('{"model": "antidistill-teacher", "messages": [', None),  # malformed JSON
        ({"model": "antidistill-teacher", "messages": "hello"}, "messages"),  # wrong type
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model 'nope' does not exist"),
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "lam": 0}, "operator-only"),
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "eps": 1.0}, "operator-only"),
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100}}, "operator-only"),
        ({"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi " * 300}]}, "limit is 200"),
    ],
)
def test_bad_input_is_400_and_server_survives(server, body, needle):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=data, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if needle:
        assert needle in err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_harmless_fields_are_ignored(server):
    r = chat(server.client(), max_tokens=3, temperature=0, extra_body={"user": "x", "frequency_penalty": 0})
    assert r.choices[0].message.content is not None


def test_logprobs_come_from_the_adjusted_distribution(server, paths):
    """Returned logprobs equal log softmax of eq. 11 as the processor computes it, never the raw teacher."""
    c = server.client()
    content = "Bob has 7 pens . Bob loses 2 pens . How many pens does Bob have now ?"
    r = chat(c, content=content, max_tokens=6, temperature=0, seed=5, logprobs=True, top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert lps
    tok = load_tokenizer(paths["teacher"])
    teacher = tiny("llama", tok, seed=1)
    proxy = tiny("qwen2", tok, seed=2)
    proc = AntidistillationLogitsProcessor(proxy, paths["grad"], lam=LAM, eps=EPS, tau=TAU, pad_token_id=tok.pad_token_id)
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    by_text = {tok.decode([i]): i for i in range(len(tok))}
    differs = False
    for entry in lps:
        with torch.no_grad():
            logits = teacher(ids).logits[:, -1].float()
            adjusted = torch.log_softmax(proc.adjusted_logits(ids, logits), -1)[0]
        raw = torch.log_softmax(logits, -1)[0]
        t = by_text[entry.token]  # temperature 0 samples q (eq. 11 at the operator's τ): the token it drew
        assert entry.logprob == pytest.approx(float(adjusted[t]), abs=1e-4)
        top = torch.topk(adjusted, 3).values.tolist()
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx(top, abs=1e-4)
        differs |= abs(entry.logprob - float(raw[t])) > 1e-3
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    assert differs, "returned logprobs must not be the teacher's raw distribution"


def test_temperature_zero_does_not_disable_the_defense(server, paths):
    """temperature 0 samples q (eq. 11), whose output differs from the plain teacher's greedy here."""
    tok = load_tokenizer(paths["teacher"])
    teacher = tiny("llama", tok, seed=1)
    content = "Eve has 9 coins . Eve finds 3 more . How many coins does Eve have now ?"
    r = chat(server.client(), content=content, max_tokens=8, temperature=0, seed=0)
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    plain = teacher.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    plain_text = tok.decode(plain[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert r.choices[0].message.content != plain_text


def test_concurrent_clients_all_succeed_or_get_429(server):
    c = server.client()

    def one(i):
        try:
            chat(c, max_tokens=8, temperature=1.0, seed=i)
            return "ok"
        except openai.RateLimitError:
            return "429"

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(one, range(32)))
    assert len(outcomes) == 32 and set(outcomes) <= {"ok", "429"}
    assert outcomes.count("ok") >= 1


def test_full_queue_gives_429_with_retry_after(paths):
    s = LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), max_tokens=64, max_batch=1, max_queue=1))
    try:
        body = {"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}

        def one(_):
            return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            rs = list(pool.map(one, range(16)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        limited = next(r for r in rs if r.status_code == 429)
        assert limited.headers["Retry-After"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.close()


def test_disconnect_stops_generation(paths):
    from stepper import Stepper, client_left, wait_for

    s = LiveServer(ServeConfig(**paths, sampling=Eq11Settings(lam=LAM, eps=EPS, tau=TAU), max_tokens=256, max_batch=1))
    try:
        body = {"model": "antidistill-teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256,
                "stream": True, "temperature": 1.0, "seed": 1}
        with Stepper(s.engine, budget=5) as st:
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for i, _line in enumerate(r.iter_lines()):
                    if i > 3:
                        break
            assert wait_for(lambda: client_left(s.engine))
            st.release()
            assert wait_for(lambda: s.engine.stats["cancelled"] == 1 and s.engine.running == 0)
        before = s.engine.stats["tokens"]
        time.sleep(0.5)
        assert s.engine.stats["tokens"] == before <= 5  # nothing more is generated for the departed client
    finally:
        s.close()
