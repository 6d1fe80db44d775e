"""The sweep's arms: how each sampling method of the experiment is made from a core method and a proxy.

The core library knows four methods (greedy, temperature, antidistill, permutation). The experiment
adds arms built from them and from the core's baselines, for the transfer ladder, the reasoning-only
variant and the literature's baselines:

* ``whitebox``: antidistillation whose proxy is the *base student itself* (g over its weights, on the
  same holdout teacher traces): Δ̂ is then exactly the direction that hurts this student.
* ``whitebox_permutation``: appendix A's permutation of the white-box Δ̂.
* ``reasoning_only``: antidistillation with the cross-family proxy on the reasoning only: λ switches
  off once the answer header is generated, so the delivered answer comes from the teacher alone.
* ``proxy_mix``: proxy-logit mixing, the Distillation Game's "product of experts" (arXiv 2605.22737):
  the teacher samples softmax(((1−γ)·log p_T + γ·log p_P)/τ) with the cross-family proxy, no gradient
  (:class:`~antidistill.mixing.ProxyMixLogitsProcessor`). Its parameter is γ ∈ [0, 1], not λ; it
  samples at the λ arms' base τ (a temperature point with the proxy mixed in).
* ``random_direction``: antidistillation with the cross-family proxy and, in g's place, a seeded
  Gaussian direction of g's norm (:func:`~antidistill.gradient.random_direction`).
* ``ensemble``: antidistillation with an ensemble of the run's ``arm_proxies``, each with its own g, equal
  weights (Δ̂ = Σ_k Δ̂_k / K, :class:`~antidistill.proxy.EnsembleDelta`); ``ensemble@-<family>`` leaves out
  the proxies of one model family, so a student of that family meets an ensemble built without it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..generation import build_processor
from ..mixing import ProxyMixLogitsProcessor


@dataclass(frozen=True)
class Arm:
    method: str  # the core sampling method
    proxy: str | None = None  # "proxy" (the cross-family proxy) or "student" (the base student: white-box)
    reasoning_only: bool = False
    param: str = "lam"  # what the arm's parameter is: "tau", "lam" or "gamma" (proxy-logit mixing's weight)
    direction: str = "g"  # the antidistillation direction: "g" (the proxy's gradient) or "random" (norm-matched)
    exclude_family: str | None = None  # an ensemble arm: the model family whose proxies it leaves out


ARMS: dict[str, Arm] = {
    "greedy": Arm("greedy", param="none"),
    "temperature": Arm("temperature", param="tau"),
    "antidistill": Arm("antidistill", "proxy"),
    "permutation": Arm("permutation", "proxy"),
    "reasoning_only": Arm("antidistill", "proxy", reasoning_only=True),
    "whitebox": Arm("antidistill", "student"),
    "whitebox_permutation": Arm("permutation", "student"),
    "proxy_mix": Arm("temperature", "proxy", param="gamma"),
    "random_direction": Arm("antidistill", "proxy", direction="random"),
    "ensemble": Arm("antidistill", "ensemble"),
}
# the arms that a config adds under ``arms:`` (the first four have their own grids); their parameter is λ,
# except proxy_mix's γ
EXTRA_ARMS = ("reasoning_only", "whitebox", "whitebox_permutation", "proxy_mix", "random_direction", "ensemble")
# what each of them asks, for the dry run
ARM_NOTES = {
    "reasoning_only": "antidistillation (cross-family proxy) on the reasoning only, λ",
    "whitebox": "antidistillation with the base student itself as proxy, λ",
    "whitebox_permutation": "the white-box Δ̂ permuted (appendix A), λ",
    "proxy_mix": "proxy-logit mixing ((1−γ)·log p_T + γ·log p_P)/τ with the cross-family proxy, no g; γ in [0, 1]",
    "random_direction": "antidistillation with a seeded Gaussian direction of ‖g‖ in g's place (cross-family proxy), λ",
    "ensemble": "antidistillation with the equal-weight ensemble of arm_proxies (and each family left out), λ",
}
# the order the report lists them in, and their colours
ORDER = ("temperature", "antidistill", "permutation", "reasoning_only", "whitebox", "whitebox_permutation",
         "proxy_mix", "random_direction", "ensemble")
COLORS = {"temperature": "tab:blue", "antidistill": "tab:red", "permutation": "tab:gray", "greedy": "k",
          "reasoning_only": "tab:orange", "whitebox": "tab:purple", "whitebox_permutation": "tab:olive",
          "proxy_mix": "tab:green", "random_direction": "tab:pink", "ensemble": "tab:brown"}


def arm_processor(arm: Arm, settings, proxy, grad, teacher_tokenizer, proxy_tokenizer, *, param: float | None = None,
                  teacher_vocab_size: int | None = None):
    """The logits processor of ``arm`` at ``settings`` (a point's :class:`~antidistill.SamplingSettings`) with its
    ``proxy`` and ``grad`` (g, or its stand-in; a γ arm uses no g); None for greedy and temperature.

    ``param``: the point's parameter. A γ arm (``proxy_mix``) needs it: its γ is not a sampling setting.
    """
    if arm.param == "gamma":
        if param is None:
            raise ValueError(f"a γ arm ({arm}) needs its γ: pass param")
        return ProxyMixLogitsProcessor(proxy, gamma=param, tau=settings.tau, teacher_tokenizer=teacher_tokenizer,
                                       proxy_tokenizer=proxy_tokenizer, teacher_vocab_size=teacher_vocab_size)
    return build_processor(settings, proxy, grad, teacher_tokenizer, proxy_tokenizer,
                           reasoning_only=arm.reasoning_only, teacher_vocab_size=teacher_vocab_size)


def arm_spec(name: str) -> Arm:
    """The arm called ``name``: an entry of :data:`ARMS`, or ``"<arm>@<model>"``, that arm with a named
    model of the proxy zoo or student panel as its proxy (issue 16), e.g. ``"antidistill@llama-same"``,
    ``"whitebox@opt"`` (the panel student ``opt`` as its own proxy), or ``"ensemble@-<family>"``, the
    ensemble without that family's proxies.

    >>> arm_spec("ensemble@-gpt2").exclude_family
    'gpt2'
    """
    base, _, model = name.partition("@")
    if base not in ARMS:
        raise ValueError(f"unknown arm {name!r}; use one of {sorted(ARMS)}, or '<arm>@<model>' for an arm with a proxy")
    arm = ARMS[base]
    if not model:
        return arm
    if arm.proxy == "ensemble":
        if not model.startswith("-") or len(model) < 2:
            raise ValueError(f"arm {name!r}: an ensemble names the family it leaves out, 'ensemble@-<family>'")
        return replace(arm, exclude_family=model[1:])
    if arm.proxy is None:
        raise ValueError(f"arm {name!r}: {base} has no proxy to name")
    if arm.param == "gamma" or arm.direction == "random":
        raise ValueError(f"arm {name!r}: {base} runs with the shipped proxy only")
    return replace(arm, proxy=model)


def base_arm(name: str) -> str:
    """``"antidistill@llama-same"`` → ``"antidistill"``; an arm without a named model is its own base."""
    return name.partition("@")[0]
