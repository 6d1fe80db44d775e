"""The composite vLLM model: the teacher and the perturbed proxies θ±εg as one model on one paged KV cache.

vLLM sees one model, ``AntidistillForCausalLM``. Inside it the teacher and two proxies (θ+εg and
θ−εg, or θ+εg and θ for ``forward``) are ordinary vLLM models with their own attention layers, so
each gets its own pages in vLLM's KV cache, shares the request's block table, and follows
continuous batching, preemption and recompute, and prefix caching exactly as the teacher does.

``forward`` runs the three models on the same tokens and positions and concatenates their hidden
states; ``compute_logits`` splits them at the sampled positions and computes Δ̂ with
:func:`antidistill.functional.finite_difference_delta`, the same function the transformers processor
uses. What ``compute_logits`` returns depends on the operator's ``output``:

- ``"eq11"`` (serving): ``log p_T + τ·λ·Δ̂``, eq. 11 multiplied by τ. vLLM's sampler divides by the
  request's temperature, which :class:`~antidistill.engines.vllm.processor.ServeLogitsProcessor` has
  already raised to at least τ. The raw teacher logits never leave the model, so no vLLM code path
  (raw logprobs, prompt logprobs) can hand them out.
- ``"teacher"`` (offline experiment): the teacher's raw logits, with Δ̂ left in :data:`DELTA` for
  :class:`~antidistill.engines.vllm.processor.OfflineLogitsProcessor`, which applies eq. 11, its
  permutation baseline or nothing, per request (answer forcing decodes the plain teacher).

The operator settings live in the ``antidistill`` entry of the composite's ``config.json``, written by
:func:`antidistill.engines.vllm.setup.write_composite`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoConfig

from ...functional import antidistillation_logits, finite_difference_delta
from ...proxy import ProxyDelta

ARCH = "AntidistillForCausalLM"
PROXY_NAMES = ("proxy_plus", "proxy_other")


class _DeltaSlot:
    """Δ̂ of the last ``compute_logits`` call in this worker process, for the offline processor
    (vLLM samples right after ``compute_logits``, in the same process, before the next forward)."""

    delta: torch.Tensor | None = None


DELTA = _DeltaSlot()


def register() -> None:
    """Register the composite with vLLM (also run in every vLLM process via the ``vllm.general_plugins`` entry point)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"{__name__}:AntidistillForCausalLM")


class AntidistillForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        cfg = vllm_config.model_config.hf_config
        ad = dict(cfg.antidistill)
        self.settings = ad
        self.lam, self.eps, self.tau = float(ad["lam"]), float(ad["eps"]), float(ad["tau"])
        self.difference, self.output = ad["difference"], ad["output"]
        teacher_cfg = copy.deepcopy(cfg)
        teacher_cfg.architectures = list(ad["teacher_architectures"])
        self.teacher = init_vllm_registered_model(
            vllm_config, hf_config=teacher_cfg, prefix=maybe_prefix(prefix, "teacher")
        )
        self.sizes = [int(cfg.hidden_size)]
        self.proxies: list[nn.Module] = []
        if ad.get("proxy"):
            # Two proxies, θ+εg and θ−εg (θ for "forward"). vLLM wants one integer (the layer index) in
            # each attention layer's name, so the sub-models are named, not numbered.
            proxy_cfg = AutoConfig.from_pretrained(ad["proxy"])
            for name in PROXY_NAMES:
                sub = init_vllm_registered_model(vllm_config, hf_config=proxy_cfg, prefix=maybe_prefix(prefix, name))
                setattr(self, name, sub)
                self.proxies.append(sub)
                self.sizes.append(int(proxy_cfg.hidden_size))
        self.make_empty_intermediate_tensors = getattr(self.teacher, "make_empty_intermediate_tensors", None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.teacher.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden = [self.teacher(input_ids, positions, intermediate_tensors, inputs_embeds)]
        for proxy in self.proxies:
            hidden.append(proxy(input_ids, positions, None, None))
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        parts = torch.split(hidden_states, self.sizes, dim=-1)
        logits = self.teacher.compute_logits(parts[0])
        if not self.proxies:
            DELTA.delta = None
            if self.output == "eq11":  # λ = 0: eq. 1, times τ
                return antidistillation_logits(logits, None, 0.0, self.tau, times_tau=True)
            return logits
        plus = self.proxies[0].compute_logits(parts[1])
        other = self.proxies[1].compute_logits(parts[2])
        v = logits.shape[-1]
        delta = finite_difference_delta(plus[..., :v], other[..., :v], self.eps, self.difference)
        if self.output == "eq11":
            DELTA.delta = None
            return antidistillation_logits(logits, delta, self.lam, self.tau, times_tau=True)
        DELTA.delta = delta
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The teacher's weights come from the composite directory; the proxies' from ``proxy`` and ``grad``."""
        loaded = {f"teacher.{n}" for n in self.teacher.load_weights(weights)}
        if self.proxies:
            pd = ProxyDelta(self.settings["proxy"], self.settings["grad"], eps=self.eps, difference=self.difference)
            for name, proxy, hf in zip(PROXY_NAMES, self.proxies, pd.models):
                names = proxy.load_weights((n, t.detach()) for n, t in hf.state_dict().items())
                loaded |= {f"{name}.{n}" for n in names}
            del pd
        return loaded
