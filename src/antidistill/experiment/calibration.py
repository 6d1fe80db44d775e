"""Holdout-only calibration of the owner's-regime design: every arm at the same teacher-accuracy targets.

A model owner asks what the defense costs relative to the teacher they would otherwise serve, so
the targets are *relative*: points below the best undefended teacher accuracy in this world (greedy
decoding, delivered scoring, on the holdout). The calibration then

1. measures greedy and the temperature curve over ``temperatures``;
2. takes the **base τ** of the defended arms: the largest τ whose accuracy is within
   ``base_tolerance`` points of greedy, read off the (monotone) temperature curve, so that λ → 0
   reaches the best accuracy (``base_tau`` fixes it instead); if even the smallest τ measured falls
   short, the smallest τ is used and the file says so;
3. chooses temperature's τ for each target (on the curve at τ ≥ base τ);
4. for each λ arm, at the base τ, searches λ on a geometric grid from ``lam_range[0]`` (factor
   ``lam_factor``) until accuracy falls below the deepest target, then bisects (in log λ)
   ``refine`` times inside the bracket of each target, and reads each target's λ off the curve by
   interpolation in log λ;
5. for proxy-logit mixing (``proxy_mix``, a γ in [0, 1]), also at the base τ, measures γ on the grid
   ``gammas`` until accuracy falls below the deepest target, bisects (in γ) ``refine`` times inside
   each target's bracket, and reads each target's γ off the curve by linear interpolation.

Every measurement samples the holdout problems (never train or test) with one seed and scores the
delivered traces, exactly as the sweep scores them. No student is trained or looked at. A target
outside an arm's measured curve gets the curve's end and is flagged (``outside_picks``).

``antidistill calibrate`` runs it alone; a sweep with ``grid: calibrated`` runs it as its first
stage and takes its points (and base τ, and each point's target) from ``calibration.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import field
from pathlib import Path

import numpy as np
from pydantic.dataclasses import dataclass

from ..functional import check_gamma, check_tau
from ..generation import generate_traces
from ..io_utils import provenance, write_json_atomic
from ..runtime import worker_pool
from ..settings import CONFIG
from .arms import ARMS, arm_spec
from .evaluate import accuracy_summary
from .inference import PRIMARY_TARGET
from .rundir import stage


@dataclass(config=CONFIG)
class CalibrationConfig:
    """Targets relative to the best undefended teacher, the arms, the τ grid and the λ search."""

    targets: list[float] = field(default_factory=lambda: [-2.0, -5.0, -10.0, -20.0])  # points vs. greedy
    arms: list[str] = field(default_factory=lambda: ["temperature", "antidistill", "whitebox", "whitebox_permutation"])
    temperatures: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1,
                                                               1.2, 1.3, 1.4, 1.6, 1.8, 2.0])
    base_tolerance: float = 1.0  # points below greedy that the base τ may lose at λ = 0
    base_tau: float | None = None  # a fixed base τ for the λ arms instead of the calibrated one
    lam_range: tuple[float, float] = (1e-4, 10.0)
    lam_factor: float = 2.5
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # proxy_mix's γ grid
    refine: int = 2  # bisection steps inside each target's bracket
    n_holdout: int | None = 300  # the first N holdout problems (None: all)
    seed: int = 0

    def __post_init__(self):
        bad = sorted(set(self.arms) - (set(ARMS) - {"greedy"}))
        if bad:
            raise ValueError(f"calibration.arms: unknown arms {bad}; use {sorted(set(ARMS) - {'greedy'})}")
        if "temperature" not in self.arms:
            raise ValueError("calibration.arms must include temperature (the baseline every arm is paired with)")
        if not self.targets or not all(-100.0 < t < 0.0 for t in self.targets):
            raise ValueError(f"calibration.targets are points below the best undefended teacher, each in (-100, 0); "
                             f"got {self.targets!r}")
        if len(self.temperatures) < 2:
            raise ValueError(f"calibration.temperatures needs at least 2 values, got {self.temperatures!r}")
        for t in self.temperatures + ([self.base_tau] if self.base_tau is not None else []):
            check_tau(t)
        lo, hi = self.lam_range
        if not (0.0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"calibration.lam_range must be 0 < low < high < inf, got {self.lam_range!r}")
        for g in self.gammas:
            check_gamma(g)
        if len(self.gammas) < 2 or sorted(set(self.gammas)) != list(self.gammas):
            raise ValueError(f"calibration.gammas needs at least 2 increasing values in [0, 1], got {self.gammas!r}")
        if self.lam_factor <= 1.0:
            raise ValueError(f"calibration.lam_factor must be > 1, got {self.lam_factor!r}")
        if self.refine < 0 or self.base_tolerance < 0:
            raise ValueError(f"calibration.refine and base_tolerance must be ≥ 0, got {self.refine!r}, "
                             f"{self.base_tolerance!r}")
        if self.n_holdout is not None and self.n_holdout < 1:
            raise ValueError(f"calibration.n_holdout must be ≥ 1 or null (all), got {self.n_holdout!r}")


def monotone(params, accs) -> tuple[np.ndarray, np.ndarray]:
    """Sorted parameters and accuracy made non-increasing in them (the running minimum)."""
    p, a = np.asarray(params, float), np.asarray(accs, float)
    order = np.argsort(p)
    return p[order], np.minimum.accumulate(a[order])


def interpolate_params(params, accs, targets, *, log: bool = False) -> list[dict]:
    """The parameter at which the measured (param, accuracy) curve reaches each target accuracy.

    Linear interpolation on the monotone curve (in log param when ``log``); a target outside the
    measured accuracies gets the nearest end and ``inside_measured_range: False``.
    """
    p, a = monotone(params, accs)
    x = np.log(p) if log else p
    out = []
    for t in targets:
        inside = bool(a.min() <= t <= a.max())
        v = float(np.interp(t, a[::-1], x[::-1]))  # np.interp needs increasing x: the reversed curve
        v = math.exp(v) if log else v
        # six significant digits: what a point's directory name (``f"{param:g}"``) shows
        out.append({"target_acc": float(t), "param": float(f"{v:.6g}"), "inside_measured_range": inside})
    return out


def base_temperature(taus, accs, best: float, tolerance: float) -> tuple[float, str]:
    """The largest τ whose (monotone) accuracy is within ``tolerance`` of ``best``, and how it was found."""
    p, a = monotone(taus, accs)
    floor = best - tolerance
    if a[0] < floor:
        return float(p[0]), (f"even the smallest τ measured ({p[0]:g}) loses more than {100 * tolerance:g} points "
                             f"against greedy ({100 * a[0]:.1f}% vs {100 * best:.1f}%): the λ arms sample at it")
    if a[-1] >= floor:
        return float(p[-1]), f"every τ measured is within {100 * tolerance:g} points of greedy: the largest is used"
    pick = interpolate_params(p, a, [floor])[0]["param"]
    return pick, f"the largest τ within {100 * tolerance:g} points of greedy ({100 * best:.1f}%) on the holdout"


def search_lambda(measure, target_accs: list[float], lam_range: tuple[float, float], factor: float,
                  refine: int) -> dict[float, float]:
    """λ → accuracy: a geometric grid until accuracy falls below the deepest target, then ``refine``
    bisections (geometric mean) inside each target's bracket. ``measure(λ)`` returns an accuracy."""
    grid, lam = [], lam_range[0]
    while lam <= lam_range[1] * (1 + 1e-9):
        lam = float(f"{lam:.6g}")
        grid.append(lam)
        lam *= factor
    return _search(measure, target_accs, grid, refine, lambda a, b: math.sqrt(a * b))


def search_gamma(measure, target_accs: list[float], gammas: list[float], refine: int) -> dict[float, float]:
    """γ → accuracy for proxy-logit mixing: the increasing grid ``gammas`` (in [0, 1]) until accuracy falls
    below the deepest target, then ``refine`` bisections (arithmetic mean) inside each target's bracket."""
    return _search(measure, target_accs, gammas, refine, lambda a, b: (a + b) / 2)


def _search(measure, target_accs: list[float], grid: list[float], refine: int, midpoint) -> dict[float, float]:
    """Measure ``grid`` in order until accuracy falls below the deepest target, then bisect each target's
    bracket ``refine`` times with ``midpoint``; parameters are rounded to 6 significant digits."""
    seen: dict[float, float] = {}
    deepest = min(target_accs)
    for x in grid:
        x = float(f"{x:.6g}")
        seen[x] = measure(x)
        if seen[x] < deepest:
            break
    for t in target_accs:
        for _ in range(refine):
            p, a = monotone(list(seen), list(seen.values()))
            i = np.flatnonzero((a[:-1] >= t) & (a[1:] < t))
            if not i.size:
                break
            mid = float(f"{midpoint(p[i[0]], p[i[0] + 1]):.6g}")
            if mid in seen:
                break
            seen[mid] = measure(mid)
    return dict(sorted(seen.items()))


def _measure(run, cfg: CalibrationConfig, holdout: list[dict], arm: str, param: float, tau: float | None,
             progress: bool) -> dict:
    """One calibration measurement: the teacher's delivered accuracy on ``holdout`` at (arm, param, τ)."""
    t0 = time.perf_counter()
    settings = run.cfg.settings_for(arm, param, cfg.seed, tau=tau)
    rows = generate_traces(run.teacher, run.tok["teacher"], holdout, settings,
                           processor=run.processor_for(arm, settings, param), progress=progress,
                           description=f"calibrate {arm} {param:g}")
    acc = accuracy_summary(rows)
    return {"param": param, "tau": settings.tau, "teacher_acc": acc["accuracy"], "ci_low": acc["ci_low"],
            "ci_high": acc["ci_high"], "forced_frac": sum(r["answer_source"] == "forced" for r in rows) / len(rows),
            "seconds": round(time.perf_counter() - t0, 1)}


def _holdout(run, cfg: CalibrationConfig) -> list[dict]:
    return run.splits["holdout"][: cfg.n_holdout] if cfg.n_holdout else run.splits["holdout"]


def _arm_curve(run, cfg: CalibrationConfig, arm: str, base_tau: float, target_accs: list[float],
               progress: bool) -> list[dict]:
    """One arm's search at the base τ: :func:`search_gamma` for a γ arm, :func:`search_lambda` otherwise;
    its measurements in order."""
    holdout, out = _holdout(run, cfg), []

    def measure(x: float) -> float:
        out.append(_measure(run, cfg, holdout, arm, x, base_tau, progress))
        return out[-1]["teacher_acc"]
    if arm_spec(arm).param == "gamma":
        search_gamma(measure, target_accs, cfg.gammas, cfg.refine)
    else:
        search_lambda(measure, target_accs, cfg.lam_range, cfg.lam_factor, cfg.refine)
    return out


def _arm_curve_in_worker(run_type, sweep_cfg, cfg: CalibrationConfig, arm: str, base_tau: float,
                         target_accs: list[float]) -> list[dict]:
    """In a pool worker: ``run_type`` (the sweep's ``Run``, pickled by reference) loads the run's cached world."""
    return _arm_curve(run_type(sweep_cfg, progress=False, worker=True), cfg, arm, base_tau, target_accs, False)


def calibrate(run, cfg: CalibrationConfig, progress: bool = True) -> Path:
    """Run the calibration on ``run``'s holdout; write ``calibration.json`` in its directory.

    ``run`` is a :class:`~antidistill.experiment.sweep.Run` (its models, splits and proxy gradients).
    With ``run.cfg.workers > 1`` the λ arms' searches run in that many worker processes.
    """
    def make(path):
        holdout = _holdout(run, cfg)
        measured: dict[str, list[dict]] = {}
        measured["greedy"] = [_measure(run, cfg, holdout, "greedy", 0.0, None, progress)]
        best = measured["greedy"][0]["teacher_acc"]
        target_accs = [best + t / 100 for t in cfg.targets]
        measured["temperature"] = [_measure(run, cfg, holdout, "temperature", tau, None, progress)
                                   for tau in cfg.temperatures]
        temps = [m["teacher_acc"] for m in measured["temperature"]]
        if cfg.base_tau is not None:
            base_tau, why = cfg.base_tau, "fixed by the config (calibration.base_tau)"
        else:
            base_tau, why = base_temperature(cfg.temperatures, temps, best, cfg.base_tolerance / 100)
        above = [(t, a) for t, a in zip(cfg.temperatures, temps) if t >= base_tau]
        if len(above) < 2:
            above = list(zip(cfg.temperatures, temps))[-2:]
        chosen = {"temperature": interpolate_params(*zip(*above), target_accs)}
        # each arm once per proxy it runs with (SweepConfig.expand_arms: the zoo's proxies, the panel's students)
        arms = [a for a in run.cfg.expand_arms(cfg.arms) if a != "temperature"]
        for arm in arms:  # their gradients exist before any worker needs them
            run.panel.gradient_path(arm)
            if arm_spec(arm).direction == "random":
                run.random_direction_path()
        n = min(run.cfg.workers, len(arms))
        if n > 1:
            with worker_pool(n) as pool:
                futures = {arm: pool.submit(_arm_curve_in_worker, type(run), run.cfg, cfg, arm, base_tau,
                                            target_accs)
                           for arm in arms}
                measured.update({arm: f.result() for arm, f in futures.items()})
        else:
            measured.update({arm: _arm_curve(run, cfg, arm, base_tau, target_accs, progress) for arm in arms})
        for arm in arms:
            ms = measured[arm]
            chosen[arm] = interpolate_params([m["param"] for m in ms], [m["teacher_acc"] for m in ms], target_accs,
                                             log=arm_spec(arm).param != "gamma")
        for picks in chosen.values():
            for c, t in zip(picks, cfg.targets):
                c["target"] = t
        write_json_atomic(path, {"config": dataclasses.asdict(cfg), "n_holdout": len(holdout), "split": "holdout",
                                 "scoring": "delivered", "best_undefended": best, "best_from": "greedy",
                                 "base_tau": base_tau, "base_tau_reason": why, "measured": measured,
                                 "chosen": chosen, **provenance()})
    return stage(run.files.calibration, make)


def outside_picks(path: Path) -> list[str]:
    """``"arm target → param"`` for every chosen value whose target lies outside the measured curve
    (the value is then the curve's end, not the target's)."""
    info = json.loads(Path(path).read_text())
    return [f"{arm} {c['target']:+g} → {c['param']:g}" for arm, picks in info["chosen"].items() for c in picks
            if not c["inside_measured_range"]]


@dataclasses.dataclass(frozen=True)
class Design:
    """What a calibration chose: each arm's parameters, each point's target, and the λ and γ arms' base τ."""

    grid: dict[str, list[float]]
    # (arm, param) → the target its rows carry. Two targets clipped to one curve end share a value: its rows
    # carry the primary target (−5) when it is one of them, so the primary endpoint keeps its pair, else the first
    targets: dict[tuple[str, float], float]
    base_tau: float | None

    @classmethod
    def load(cls, path: Path) -> Design:
        info = json.loads(Path(path).read_text())
        targets: dict[tuple[str, float], float] = {}
        for arm, picks in info["chosen"].items():
            for c in picks:
                key = (arm, c["param"])
                if key not in targets or c.get("target") == PRIMARY_TARGET:
                    targets[key] = c.get("target")
        grid = {arm: sorted({c["param"] for c in picks}) for arm, picks in info["chosen"].items()}
        return cls(grid=grid, targets=targets, base_tau=info.get("base_tau"))


def chosen_grid(path: Path) -> dict[str, list[float]]:
    """Each calibrated arm's chosen τ or λ values (sorted; two targets on the same value merge)."""
    return Design.load(path).grid
