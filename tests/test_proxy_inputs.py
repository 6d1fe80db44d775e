"""What the proxy sees: padding from the caller (never guessed), Δ̂ at the teacher's width, and
models the caller passes in left as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, PAD, random_grad, reference_delta, tiny_proxy, tiny_teacher

from antidistill import AntidistillationLogitsProcessor, ProxyDelta, generate
from antidistill.experiment.fdcheck import fd_check

EPS = 1e-2
BOS = 2


def test_the_caller_s_mask_keeps_a_bos_that_is_also_the_pad_id():
    """pad id == BOS: guessing from leading pad ids would mask the BOS; the caller's mask does not."""
    proxy = tiny_proxy()
    grad = random_grad(proxy)
    row = [BOS, 7, 9, 11]
    ids = torch.tensor([[BOS, BOS] + row])  # two pads (= BOS) then the real row, which starts with BOS
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    ref = reference_delta(proxy, grad, EPS, row)
    with_mask = ProxyDelta(proxy, grad, eps=EPS, pad_token_id=BOS)(ids, mask)[0]
    torch.testing.assert_close(with_mask, ref, atol=2e-4, rtol=1e-3)
    guessed = ProxyDelta(proxy, grad, eps=EPS, pad_token_id=BOS)(ids)[0]  # no mask: three leading BOS are padding
    assert not torch.allclose(guessed, ref, atol=2e-4, rtol=1e-3)


def test_the_proxy_config_pad_id_is_never_used():
    proxy = tiny_proxy()  # its config says pad_token_id = PAD
    grad = random_grad(proxy)
    row = [PAD, 5, 9]  # a real token that happens to be the config's pad id
    got = ProxyDelta(proxy, grad, eps=EPS)(torch.tensor([row]))[0]
    torch.testing.assert_close(got, reference_delta(proxy, grad, EPS, row), atol=2e-4, rtol=1e-3)


def test_generate_hands_its_mask_to_the_processor_and_refuses_another_pad_id():
    teacher, proxy = tiny_teacher(), tiny_proxy()
    grad = random_grad(proxy)
    proc = AntidistillationLogitsProcessor(proxy, grad, lam=0.5, eps=EPS, tau=1.0, pad_token_id=PAD)
    seen = []

    class Spy:  # records the mask ProxyDelta is called with
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, input_ids, attention_mask=None):
            seen.append(attention_mask)
            return self.inner(input_ids, attention_mask)

    proc.proxy_delta = Spy(proc.proxy_delta)
    ids = torch.tensor([[PAD, BOS, 5], [BOS, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    generate(teacher, input_ids=ids, attention_mask=mask, processor=proc, max_new_tokens=2, pad_token_id=PAD,
             eos_token_id=EOS)
    assert torch.equal(seen[0], mask) and torch.equal(seen[1][:, :3], mask) and seen[1][:, 3:].eq(1).all()
    assert proc.prompt_mask is None  # handed over for one call only
    with pytest.raises(ValueError, match=r"generate\(pad_token_id=1\) does not match the processor's pad_token_id=0"):
        generate(teacher, input_ids=ids, attention_mask=mask, processor=proc, max_new_tokens=1, pad_token_id=1)


def test_mask_of_another_shape_is_an_error():
    proxy = tiny_proxy()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\), input_ids \(1, 3\)"):
        ProxyDelta(proxy, random_grad(proxy), eps=EPS)(torch.tensor([[2, 5, 9]]), torch.ones(1, 2))


@pytest.mark.parametrize("teacher_width", [40, 56])
def test_delta_at_the_teacher_s_width(teacher_width):
    """A teacher with more (or fewer) embedding rows than the proxy: Δ̂ is cut, or 0 past the proxy's rows."""
    proxy = tiny_proxy()
    grad = random_grad(proxy)
    ids = torch.tensor([[2, 5, 9]])
    full = ProxyDelta(proxy, grad, eps=EPS)(ids)
    got = ProxyDelta(proxy, grad, eps=EPS, vocab_size=teacher_width)(ids)
    n = min(teacher_width, full.shape[-1])
    assert got.shape == (1, teacher_width)
    torch.testing.assert_close(got[:, :n], full[:, :n])
    assert got[:, n:].eq(0).all()


@pytest.mark.parametrize("difference", ["forward", "jvp"])
def test_proxy_delta_leaves_a_training_or_sdpa_model_as_it_was(difference):
    proxy = tiny_proxy(attn="sdpa").train()
    before = copy.deepcopy(proxy.state_dict())
    ProxyDelta(proxy, random_grad(proxy), eps=EPS, difference=difference)(torch.tensor([[2, 5, 9]]))
    assert proxy.training and proxy.config._attn_implementation == "sdpa"
    for k, v in proxy.state_dict().items():
        assert torch.equal(v, before[k])


def test_fd_check_leaves_a_bf16_proxy_in_bf16():
    proxy = tiny_proxy().to(torch.bfloat16)
    grad = random_grad(proxy)
    before = {k: v.clone() for k, v in proxy.state_dict().items()}
    fd_check(proxy, grad, torch.tensor([[2, 5, 9, 11]]), eps_grid=[1e-2], dtypes=("float32",), include_jvp=False)
    assert all(p.dtype == torch.bfloat16 for p in proxy.parameters())
    assert all(torch.equal(v, before[k]) for k, v in proxy.state_dict().items())
