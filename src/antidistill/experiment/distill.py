"""Distil a student on teacher traces: TRL ``SFTTrainer``, PEFT LoRA, completion-only loss; optionally
weighted per trace (:class:`WeightedSFTTrainer`, the gradient-alignment distiller's loss)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from pydantic import Field
from pydantic.dataclasses import dataclass
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from ..prompting import chat_messages
from ..settings import CONFIG


@dataclass(config=CONFIG)
class DistillConfig:
    """Defaults follow the paper (LoRA r = α, dropout 0, all linear layers, wd 0.1, clip 1.0, cosine,
    warm-up, 3 epochs, batch 16), with r and the learning rate scaled to the toy models.

    Toy scale: r = 64 is half the toy student's width (the paper's r = 128 is 1/24 of Llama-3B's) and
    lr = 5e-3. They were chosen on greedy teacher traces alone, before any antidistillation run, as
    the smallest setting tried that lifts the student off the floor (r = 16 at lr 2e-3 left it at
    3-5% test accuracy)."""

    lora: bool = True
    lora_r: int = Field(64, ge=1)
    lora_alpha: int = Field(64, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lr: float = Field(5e-3, gt=0.0, allow_inf_nan=False)
    weight_decay: float = Field(0.1, ge=0.0)
    epochs: float = Field(3.0, gt=0.0, allow_inf_nan=False)
    batch_size: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(512, ge=1)
    eval_every: int = Field(20, ge=1)  # steps between holdout-loss evaluations (loss-dynamics plot)
    # bf16 autocast: None picks it on a CUDA device with bf16 support and fp32 elsewhere. TRL's own
    # default (bf16 everywhere), with its activation checkpointing, ran a toy-student step 6x slower
    # on a CPU without native bf16 (AVX2 EPYC: 2.6 s against 0.43 s in fp32).
    bf16: bool | None = None
    # recompute activations in the backward pass: saves memory for large students, costs a forward
    # pass; TRL turns it on by default, here it is off unless asked for.
    gradient_checkpointing: bool = False


def sft_rows(rows: list[dict], system_prompt: str | None = None) -> list[dict]:
    """Prompt-completion conversational rows for TRL: the loss falls on the completion only."""
    return [
        {"prompt": chat_messages(r["question"], system_prompt),
         "completion": [{"role": "assistant", "content": r["completion"]}]}
        for r in rows
    ]


def distill(
    student,
    tokenizer,
    traces: list[dict],
    cfg: DistillConfig,
    *,
    output_dir: str | Path,
    eval_traces: list[dict] | None = None,
    seed: int = 0,
    system_prompt: str | None = None,
    progress: bool = False,
    weights: list[float] | None = None,
):
    """Fine-tune ``student`` on ``traces`` (``question``/``completion``); returns (model, loss history).

    The history holds ``{"step", "loss"}`` train entries and ``{"step", "eval_loss"}`` entries on
    ``eval_traces`` (clean holdout traces), for the loss-dynamics plot (paper Fig. 5). With LoRA the
    adapter is merged into the returned model. ``weights`` (one ≥ 0 per trace): each trace's token
    losses count ``weights[i]`` times (:class:`WeightedSFTTrainer`); None is plain SFT.
    """
    if not traces:
        raise ValueError("no traces to distil from")
    if weights is not None:
        _check_weights(weights, len(traces))
    train_ds = Dataset.from_list(sft_rows(traces, system_prompt))
    if weights is not None:
        train_ds = train_ds.add_column("weight", [float(w) for w in weights])
    eval_ds = Dataset.from_list(sft_rows(eval_traces, system_prompt)) if eval_traces else None
    args = SFTConfig(
        output_dir=str(output_dir), learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 32), lr_scheduler_type="cosine",
        warmup_steps=max(1, int(cfg.warmup_ratio * cfg.epochs * len(traces) / cfg.batch_size)),
        max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length, completion_only_loss=True,
        logging_steps=max(1, cfg.eval_every // 2), eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=cfg.eval_every, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        disable_tqdm=not progress, use_cpu=not _has_cuda(), dataloader_num_workers=0,
        bf16=_use_bf16(cfg.bf16), gradient_checkpointing=cfg.gradient_checkpointing,
        **({} if weights is None else {"remove_unused_columns": False}),  # keep the weight column
    )
    peft_config = None
    if cfg.lora:
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer_cls = SFTTrainer if weights is None else WeightedSFTTrainer
    trainer = trainer_cls(model=student, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=peft_config)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    trainer.train()
    history = [
        {k: float(v) if k != "step" else int(v) for k, v in h.items() if k in ("step", "loss", "eval_loss")}
        for h in trainer.state.log_history
        if "loss" in h or "eval_loss" in h
    ]
    model = trainer.model
    if cfg.lora:
        model = model.merge_and_unload()
    model.eval()
    return model, history


class WeightedSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss weights each example's tokens by the example's ``weight`` column.

    loss = Σ_i w_i Σ_t −log p(y_it) / N, with N the batch's completion-token count as TRL counts it: with
    every w_i = 1 this is exactly ``SFTTrainer``'s loss, and a trace with w_i = 0 adds no gradient.
    Examples without a ``weight`` (the eval set) get TRL's own loss. Needs ``remove_unused_columns=False``
    so the column reaches the collator, which :func:`distill` sets.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = _WeightCollator(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("weight", None)
        if weight is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        per_token = -outputs.log_probs * weight.to(outputs.log_probs.dtype)[:, None]  # zero where no label
        loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss


class _WeightCollator:
    """Wraps the trainer's collator: the batch gains ``weight`` (B,) when the examples carry one."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        batch = self.base(examples)
        if examples and "weight" in examples[0]:
            batch["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
        return batch


def _check_weights(weights: list[float], n: int) -> None:
    if len(weights) != n:
        raise ValueError(f"weights must give one weight per trace: {len(weights)} weights for {n} traces")
    bad = [w for w in weights if not (math.isfinite(float(w)) and float(w) >= 0)]
    if bad:
        raise ValueError(f"weights must be finite and ≥ 0, got {bad[:5]}")


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _use_bf16(requested: bool | None) -> bool:
    """``requested`` if set, else bf16 autocast exactly when a CUDA device supports it."""
    if requested is not None:
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
