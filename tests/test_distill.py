"""Distillation's precision and activation checkpointing: chosen by the config, not by TRL's defaults."""

from __future__ import annotations

import pytest
import torch

from antidistill.experiment.distill import DistillConfig, _use_bf16, distill
from antidistill.tokenizer_compat import load_tokenizer

from helpers_world import tiny, toy_splits, toy_tokenizer_dir


def _trace_dtypes_and_block_calls(tmp_path, **cfg):
    """Distil a tiny GPT-2 on 8 traces (2 steps of 4) and record what its first block saw."""
    tok = load_tokenizer(toy_tokenizer_dir(str(tmp_path)))
    student = tiny("gpt2", tok, seed=4)
    traces = [{"question": r["question"], "completion": r["solution"]} for r in toy_splits()["train"][:8]]
    dtypes, calls = set(), [0]

    def hook(module, args, out):
        calls[0] += 1
        dtypes.add(out[0].dtype)  # the attention's output projection runs under autocast if it is on

    student.transformer.h[0].attn.register_forward_hook(hook)
    distill(student, tok, traces, DistillConfig(epochs=1.0, batch_size=4, **cfg), output_dir=tmp_path / "run")
    return dtypes, calls[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic choice is fp32 only without CUDA")
def test_cpu_distillation_is_fp32_without_recomputation(tmp_path):
    assert _use_bf16(None) is False
    dtypes, calls = _trace_dtypes_and_block_calls(tmp_path)
    assert dtypes == {torch.float32}
    assert calls == 2  # one forward per step: no checkpoint recomputation


def test_bf16_and_checkpointing_when_asked(tmp_path):
    assert _use_bf16(True) is True and _use_bf16(False) is False
    dtypes, calls = _trace_dtypes_and_block_calls(tmp_path, bf16=True, gradient_checkpointing=True)
    assert dtypes == {torch.bfloat16}
    assert calls == 4  # each step's forward runs again in the backward pass
