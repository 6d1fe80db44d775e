"""The sweep's arms: how each sampling method of the experiment is made from a core method and a proxy.

The core library knows four methods (greedy, temperature, antidistill, permutation). The experiment
adds three arms built from them, for the transfer ladder and the reasoning-only variant:

* ``whitebox``: antidistillation whose proxy is the *base student itself* (g over its weights, on the
  same holdout teacher traces): Δ̂ is then exactly the direction that hurts this student.
* ``whitebox_permutation``: appendix A's permutation of the white-box Δ̂.
* ``reasoning_only``: antidistillation with the cross-family proxy on the reasoning only: λ switches
  off once the answer header is generated, so the delivered answer comes from the teacher alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    method: str  # the core sampling method
    proxy: str | None = None  # "proxy" (the cross-family proxy) or "student" (the base student: white-box)
    reasoning_only: bool = False


ARMS: dict[str, Arm] = {
    "greedy": Arm("greedy"),
    "temperature": Arm("temperature"),
    "antidistill": Arm("antidistill", "proxy"),
    "permutation": Arm("permutation", "proxy"),
    "reasoning_only": Arm("antidistill", "proxy", reasoning_only=True),
    "whitebox": Arm("antidistill", "student"),
    "whitebox_permutation": Arm("permutation", "student"),
}
# the arms whose parameter is λ and that a config adds under ``arms:`` (the first four have their own grids)
EXTRA_ARMS = ("reasoning_only", "whitebox", "whitebox_permutation")
# the order the report lists them in, and their colours
ORDER = ("temperature", "antidistill", "permutation", "reasoning_only", "whitebox", "whitebox_permutation")
COLORS = {"temperature": "tab:blue", "antidistill": "tab:red", "permutation": "tab:gray", "greedy": "k",
          "reasoning_only": "tab:orange", "whitebox": "tab:purple", "whitebox_permutation": "tab:olive"}


def arm_spec(name: str) -> Arm:
    """The arm called ``name``: an entry of :data:`ARMS`, or ``"<arm>@<model>"``, that arm with a named
    model of the proxy zoo or student panel as its proxy (issue 16), e.g. ``"antidistill@llama-same"``,
    ``"whitebox@opt"`` (the panel student ``opt`` as its own proxy)."""
    base, _, model = name.partition("@")
    if base not in ARMS:
        raise ValueError(f"unknown arm {name!r}; use one of {sorted(ARMS)}, or '<arm>@<model>' for an arm with a proxy")
    arm = ARMS[base]
    if not model:
        return arm
    if arm.proxy is None:
        raise ValueError(f"arm {name!r}: {base} has no proxy to name")
    return Arm(arm.method, model, arm.reasoning_only)


def base_arm(name: str) -> str:
    """``"antidistill@llama-same"`` → ``"antidistill"``; an arm without a named model is its own base."""
    return name.partition("@")[0]
