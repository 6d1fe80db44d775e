"""The sweep's config: data and models, the grid of sampling points and arms, distillation, calibration
and workers.

Apart from the sweep runner (``sweep``), so that what only needs a config (the toy world's default
artifacts, say) can read one without importing the runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import field_validator
from pydantic.dataclasses import dataclass

from ..config import to_dict
from ..functional import check_gamma, check_lam, check_tau
from ..settings import CONFIG, METHODS, SamplingSettings
from ..toyworld.build import ToyWorldConfig
from .arms import ARMS, EXTRA_ARMS, arm_spec, base_arm
from .calibration import CalibrationConfig
from .data import DATASETS
from .distill import DistillConfig
from .distillers import (NAIVE, DistillerConfig, DistillerScope, Naive, check_distillers, distiller_entries,
                         distiller_record)
from .rundir import point_name

# what the sweep's points start from unless its config says otherwise
SWEEP_SAMPLING = {"tau": 0.9, "top_p": 0.95, "max_new_tokens": 80, "batch_size": 64}


@dataclass(config=CONFIG)
class Replicates:
    """Further seeds at chosen calibrated targets: each of ``seeds`` runs every point whose rows carry one of
    ``targets`` again, with its own sampling and distillation seed, as the naive distiller into the base
    student only. They add runs where an endpoint is read, at a fraction of a world's cost; the gate, the
    adaptive distillers and the panel read the sweep's own ``seeds`` alone.

    >>> Replicates(targets=[-5.0], seeds=[1, 2]).covers(-5.0), Replicates().covers(-5.0)
    (True, False)
    """

    targets: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self):
        if bool(self.targets) != bool(self.seeds):
            raise ValueError(f"replicate needs both targets and seeds (or neither), got targets={self.targets!r}, "
                             f"seeds={self.seeds!r}")
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"replicate.seeds lists a seed more than once: {self.seeds!r}")

    def covers(self, target: float | None) -> bool:
        return target is not None and target in self.targets

    def points(self, targets: dict[tuple[str, float], float]) -> list[tuple[str, float, int]]:
        """The replicate points of a design whose (arm, param) → target map is ``targets``."""
        return [(m, x, s) for s in self.seeds for (m, x), t in sorted(targets.items()) if self.covers(t)]


@dataclass(config=CONFIG)
class SweepConfig:
    """The whole experiment: data and models, the grid of sampling points, distillation, and workers.

    ``sampling`` holds the settings every point starts from; a point then sets the method, its seed,
    τ (temperature points: the grid value; the others keep ``sampling.tau``) and λ (antidistillation
    and permutation points: the grid value).
    """

    name: str = "demo"
    runs_dir: str = "runs"
    cache_dir: str = ".cache/antidistill"
    # data and models: "toy" builds the offline toy world; otherwise gsm8k | math | mmlu with HF model paths
    dataset: str = "toy"
    data_path: str | None = None
    teacher: str | None = None
    proxy: str | None = None
    student: str | None = None
    # a local folder holding a role's tokenizer (and config.json, if any), for a model named on the hub:
    # the run loads that role's tokenizer from it, and --dry-run works offline
    tokenizer_dirs: dict[Literal["teacher", "proxy", "student"], str] = field(default_factory=dict)
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    limit_train: int | None = None
    limit_test: int | None = None
    # where each arm's τ or λ values come from: "config" (the lists below) or "calibrated" (the run's
    # first stage is the holdout-only calibration, `calibration` below, and every arm it calibrates
    # takes the values it chose for its target teacher accuracies; the lists below are then unused).
    # "calibrated" re-fits the grid to the world at hand: toy weights differ by CPU, and so do the λ
    # that reach a given teacher accuracy.
    grid: Literal["config", "calibrated"] = "config"
    # the sweep's grid when grid="config" (the defaults are illustrative; the shipped configs calibrate theirs)
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.3, 1.6])
    ad_lambdas: list[float] = field(default_factory=lambda: [0.003, 0.008, 0.013, 0.018])
    perm_lambdas: list[float] = field(default_factory=lambda: [0.008, 0.018])
    # further arms and their grids: reasoning_only, whitebox, whitebox_permutation, random_direction (λ) and
    # proxy_mix (γ in [0, 1]) (see experiment.arms)
    arms: dict[str, list[float]] = field(default_factory=dict)
    # the zoo proxies (world.zoo.proxies, or the shipped proxy's name) the proxy arms run with, each arm once
    # per proxy ("antidistill@<name>"); empty: the shipped proxy alone. With a student panel (world.zoo.panel)
    # the white-box arms run once per panel student, each student as its own proxy ("whitebox@<name>"), and
    # every arm's traces are distilled into every panel student.
    arm_proxies: list[str] = field(default_factory=list)
    include_greedy: bool = True
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(**SWEEP_SAMPLING))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    distill: DistillConfig = field(default_factory=DistillConfig)
    # who distils each point's traces: every point's traces are distilled once per entry (experiment.distillers:
    # naive, correct_only, clean_mix, harder, grad_align, answers_only, warm_start; a bare name takes its defaults)
    distillers: list[DistillerConfig] = field(default_factory=lambda: [Naive()])
    # where the distillers other than the naive one run (default: every point), e.g. only at the primary
    # target's temperature and defended points: {targets: [-5.0], arms: [temperature, antidistill, whitebox]}
    distill_at: DistillerScope = field(default_factory=DistillerScope)
    # further seeds at chosen targets, naive distiller and base student only, e.g. {targets: [-5.0], seeds: [1, 2]}
    replicate: Replicates = field(default_factory=Replicates)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # antidistill calibrate
    n_eval_traces: int = 100  # clean holdout traces for the student's loss-dynamics record (Fig. 5)
    # sweep points run in this many processes at once, each with cores // workers torch threads. On a
    # CPU the toy models are too small to keep two cores busy from one process, so 2 workers on 2 cores
    # finish the points sooner. Results depend on the seeds, not on the worker that ran a point.
    workers: int = 1
    # what generates the teacher's traces: transformers (hf), or vLLM (the `vllm` extra; one engine per
    # point, greedy/temperature/antidistill/permutation points only). Students are always transformers.
    engine: Literal["hf", "vllm"] = "hf"
    # where a point's teacher accuracy is measured: on the traces the student trains on ("traces": exactly
    # what the student receives, no extra generation) or on the test split ("test")
    teacher_eval: Literal["traces", "test"] = "test"
    # the student-learns-from-teacher gate, checked on greedy and temperature points before any other arm
    # runs: "stop" ends the run there when a world fails it, "warn" goes on, "skip" does not check it
    gate: Literal["stop", "warn", "skip"] = "skip"
    gate_min_greedy_student: float = 0.45  # a student distilled on greedy traces reaches this test accuracy
    gate_min_slope: float = 0.2  # student points per teacher point under temperature sampling
    # read the gate instead of measuring it: a folder of runs or exported worlds (e.g. `--full`'s
    # docs/results/full/worlds) holding this world build's gate.json (results_io.recorded_gate). For a design
    # run on worlds another design has gated: the transfer matrix's one temperature point fits no slope
    gate_from: str | None = None

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling_defaults(cls, v):
        """A partial ``sampling`` mapping fills in from the sweep's defaults, not the library's."""
        return SWEEP_SAMPLING | v if isinstance(v, dict) else v

    @field_validator("distillers", mode="before")
    @classmethod
    def _distiller_names(cls, v):
        return distiller_entries(v)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain directory name, got name={self.name!r}")
        if self.dataset != "toy":
            if self.dataset not in DATASETS:
                raise ValueError(f"dataset must be 'toy' or one of {sorted(DATASETS)}, got dataset={self.dataset!r}")
            missing = [r for r in ("teacher", "proxy", "student") if getattr(self, r) is None]
            if missing:
                raise ValueError(f"dataset={self.dataset!r} needs model paths for {missing}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.workers < 1:
            raise ValueError(f"workers must be an integer ≥ 1, got workers={self.workers!r}")
        for t in self.temperatures:
            check_tau(t)
        for lam in self.ad_lambdas + self.perm_lambdas + [x for a, grid in self.arms.items() if a != "proxy_mix"
                                                          for x in grid]:
            check_lam(lam)
        for gamma in self.arms.get("proxy_mix", []):
            check_gamma(gamma)
        if self.grid == "calibrated" and self.engine != "hf":
            raise ValueError(f"grid='calibrated' needs engine='hf' (the calibration runs on transformers), "
                             f"got engine={self.engine!r}")
        if self.engine != "hf" and any(self.arms.values()):
            raise ValueError(f"engine={self.engine!r} runs greedy, temperature, antidistill and permutation points; "
                             f"the arms {sorted(k for k, v in self.arms.items() if v)} run on engine='hf'")
        if self.gate_from is not None and (self.gate == "skip" or self.dataset != "toy"):
            raise ValueError(f"gate_from reads a toy world's recorded gate: it needs gate 'stop' or 'warn' and "
                             f"dataset 'toy', got gate={self.gate!r}, dataset={self.dataset!r}")
        check_distillers(self.distillers)
        if not self.distill_at.everywhere and NAIVE not in [d.kind for d in self.distillers]:
            raise ValueError("distill_at limits the adaptive distillers to some points; the others need the naive "
                             "distiller: add naive to distillers")
        if self.distill_at.targets is not None and self.grid != "calibrated":
            raise ValueError(f"distill_at.targets={self.distill_at.targets!r} names calibrated targets; it needs "
                             f"grid='calibrated' (got grid={self.grid!r}): scope a config grid by distill_at.arms")
        unknown = sorted(set(self.arms) - set(EXTRA_ARMS))
        if unknown:
            raise ValueError(f"unknown arms {unknown}; arms may list {list(EXTRA_ARMS)}")
        if self.arm_proxies or self.world.zoo is not None and self.world.zoo.panel:
            if self.dataset != "toy":
                raise ValueError(f"arm_proxies and a student panel name toy-world models; dataset={self.dataset!r}")
            if self.engine != "hf":
                raise ValueError(f"arm_proxies and a student panel run on engine='hf', got engine={self.engine!r}")
        if any(base_arm(a) == "ensemble" for a in [*self.arms, *self.calibration.arms]) and len(self.arm_proxies) < 2:
            raise ValueError(f"the ensemble arm averages the arm_proxies' Δ̂: list at least 2 in arm_proxies, got "
                             f"{self.arm_proxies!r}")
        zoo = self.world.zoo_or_default()
        known = [zoo.shipped_proxy, *zoo.proxies]
        bad = sorted(set(self.arm_proxies) - set(known))
        if bad or len(set(self.arm_proxies)) < len(self.arm_proxies):
            raise ValueError(f"arm_proxies must name distinct proxies of the world's zoo {known}, got "
                             f"{self.arm_proxies!r}")
        if any(base_arm(a) == "ensemble" for a in [*self.arms, *self.calibration.arms]):
            for family in self.ensemble_left_out():
                if len(self.ensemble_members(f"ensemble@-{family}")) < 2:
                    raise ValueError(f"the ensemble without family {family!r} (a panel student's) keeps "
                                     f"{self.ensemble_members(f'ensemble@-{family}')} of arm_proxies "
                                     f"{self.arm_proxies!r}: an ensemble needs at least 2 proxies of other families")
        self._check_distill_at()
        if self.replicate.seeds:
            if self.grid != "calibrated":
                raise ValueError(f"replicate names calibrated targets; it needs grid='calibrated' (got grid={self.grid!r})")
            bad = sorted(set(self.replicate.targets) - set(self.calibration.targets))
            if bad:
                raise ValueError(f"replicate.targets {bad} are not among calibration.targets {self.calibration.targets}")
            both = sorted(set(self.replicate.seeds) & set(self.seeds))
            if both:
                raise ValueError(f"replicate.seeds {both} are already among seeds {self.seeds}")

    def is_replicate(self, seed: int) -> bool:
        """Whether a point's ``seed`` is not one of the sweep's own ``seeds``: among its points, a replicate seed's
        (naive distiller, base student only)."""
        return seed not in self.seeds

    def _check_distill_at(self) -> None:
        """``distill_at`` must name targets this design calibrates and arms it runs: a scope that selects no
        point would run no variant while still preparing their per-seed artifacts."""
        scope = self.distill_at
        if scope.targets is not None and self.grid == "calibrated":
            bad = sorted(set(scope.targets) - set(self.calibration.targets))
            if bad:
                raise ValueError(f"distill_at.targets {bad} are not among calibration.targets {self.calibration.targets}")
        if scope.arms is not None:
            runs = ({"temperature", *self.expand_arms(self.calibration.arms)} if self.grid == "calibrated"
                    else {m for m, _, _ in self.points()} - {"greedy"})
            bad = sorted(set(scope.arms) - runs)
            if bad:
                raise ValueError(f"distill_at.arms {bad} run at no point of this design; it runs {sorted(runs)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def expand_arms(self, arms) -> list[str]:
        """Each arm once per model it runs with: a proxy arm once per ``arm_proxies`` entry (the shipped proxy
        keeps the bare name), a white-box arm once per panel student (the base student keeps the bare name)."""
        zoo = self.world.zoo_or_default()
        out = []
        for a in arms:
            spec = arm_spec(a)
            proxy = spec.proxy
            if proxy == "ensemble" and "@" not in a:  # the whole ensemble, then each family left out
                out += [a] + [f"{a}@-{f}" for f in self.ensemble_left_out()]
            elif "@" in a or proxy not in ("proxy", "student") or spec.param == "gamma" or spec.direction == "random":
                out.append(a)  # the baselines run with the shipped proxy only
            elif proxy == "proxy":
                out += [a if p == zoo.shipped_proxy else f"{a}@{p}" for p in self.arm_proxies or [zoo.shipped_proxy]]
            else:
                out += [a] + [f"{a}@{s}" for s in zoo.panel]
        return out

    def ensemble_left_out(self) -> list[str]:
        """The families an ensemble arm leaves out, one arm each: those of the panel's students (base student
        first) that some ``arm_proxies`` entry has, so every student meets an ensemble without its family."""
        specs = self.world.named_specs()
        proxy_families = {specs[p][2].family for p in self.arm_proxies}
        return list(dict.fromkeys(f for f in (specs[s][2].family for s in self.panel()) if f in proxy_families))

    def ensemble_members(self, method: str) -> list[str]:
        """The ``arm_proxies`` of ensemble arm ``method`` (``ensemble``: all; ``ensemble@-<family>``: all but
        that family's); a ValueError when none is left."""
        spec, specs = arm_spec(method), self.world.named_specs()
        if spec.proxy != "ensemble":
            raise ValueError(f"{method!r} is not an ensemble arm")
        members = [p for p in self.arm_proxies if specs[p][2].family != spec.exclude_family]
        if not members:
            raise ValueError(f"arm {method!r} leaves no proxy of arm_proxies {self.arm_proxies!r}")
        return members

    def panel(self) -> list[str]:
        """The students every arm's traces are distilled into: the base student first, then the panel's."""
        zoo = self.world.zoo_or_default()
        return [zoo.base_student, *zoo.panel]

    def config_grid(self) -> dict[str, list[float]]:
        """Each arm's τ or λ values as this config lists them (``grid="config"``), per :meth:`expand_arms`."""
        base = {"temperature": self.temperatures, "antidistill": self.ad_lambdas, "permutation": self.perm_lambdas,
                **self.arms}
        return {name: values for arm, values in base.items() for name in self.expand_arms([arm])}

    def points(self, grid: dict[str, list[float]] | None = None) -> list[tuple[str, float, int]]:
        """(method, parameter, seed): the parameter is τ for temperature and λ otherwise.

        ``grid`` (arm → values, e.g. from a calibration) replaces :meth:`config_grid`; a config with
        ``grid="calibrated"`` needs it (its points come from the run's calibration stage).
        """
        if grid is None:
            if self.grid == "calibrated":
                raise ValueError("grid='calibrated': the points come from the run's calibration (Run.points())")
            grid = self.config_grid()
        pts = []
        for s in self.seeds:
            if self.include_greedy:
                pts.append(("greedy", 0.0, s))
            pts += [(name, x, s) for arm in ("temperature", "antidistill", "permutation", *EXTRA_ARMS)
                    for name in grid if base_arm(name) == arm for x in grid[name]]
        names = [point_name(*pt) for pt in pts]
        if len(set(names)) < len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"two points share a directory name {dup}: their parameters differ past 6 significant digits")
        return pts

    def settings_for(self, method: str, param: float, seed: int, tau: float | None = None) -> SamplingSettings:
        """The sampling settings of a point; ``method`` is a core method or an arm (``experiment.arms``).

        ``tau``: the λ arms' base τ (a calibrated design's), in place of ``sampling.tau``. A γ arm
        (``proxy_mix``) samples as temperature at that τ; its γ is not a sampling setting but its
        processor's (``Run.processor_for``). An arm may name a zoo model (``"<arm>@<model>"``)."""
        arm = None
        if method not in METHODS:
            try:
                arm = arm_spec(method)
            except ValueError:
                raise ValueError(f"unknown method {method!r}; use one of {sorted(set(METHODS) | set(ARMS))}") from None
            method = arm.method
        base = dataclasses.asdict(self.sampling) | {"method": method, "seed": seed, "lam": 0.0}
        if arm is not None and arm.param == "gamma":  # γ goes to the arm's processor: the teacher samples at τ
            check_gamma(param)
            if tau is not None:
                base["tau"] = tau
        elif method == "temperature":
            base["tau"] = param
        elif method != "greedy":
            base["lam"] = param
            if tau is not None:
                base["tau"] = tau
        return SamplingSettings(**base)


def config_text(cfg: SweepConfig) -> str:
    """The run directory's ``config.yaml``: the config as YAML, leaving out ``distillers`` when it is only the
    naive one, ``distill_at`` when it is every point, ``calibration.gammas`` when it is the default,
    ``arm_proxies`` when empty, ``world.zoo`` and ``gate_from`` when unset, so a config written before these
    existed keeps its text and its run directory resumes; likewise ``replicate`` when it has no seeds, and a distiller's
    settings added later at their defaults (``distiller_record``)."""
    data = to_dict(cfg)
    if not cfg.replicate.seeds:
        del data["replicate"]
    if [d.kind for d in cfg.distillers] == ["naive"]:
        del data["distillers"]
    else:
        data["distillers"] = [distiller_record(d) for d in cfg.distillers]
    if cfg.distill_at.everywhere:
        del data["distill_at"]
    if data["calibration"]["gammas"] == CalibrationConfig().gammas:  # added later: default configs keep their text
        del data["calibration"]["gammas"]
    if not cfg.arm_proxies:
        del data["arm_proxies"]
    if cfg.world.zoo is None:
        del data["world"]["zoo"]
    if cfg.gate_from is None:
        del data["gate_from"]
    return yaml.safe_dump(data, sort_keys=False)  # as config.dump_yaml writes it


# what a run may change on resume: each distiller has its own stages and rows, and a replicate seed its own
# points, while the points and naive rows already made are unchanged
DISTILLER_KEYS = ("distillers", "distill_at", "replicate")


def same_but_distillers(text: str, other: str) -> bool:
    """Whether two ``config.yaml`` texts differ at most in which distillers run where (:data:`DISTILLER_KEYS`).

    A run that gains (or drops) adaptive distillers, or changes where they run, or gains replicate seeds
    (``replicate``), keeps every other stage: the points' traces, the naive students and their rows are made
    the same way, so the run directory resumes and adds the new rows (a dropped distiller or replicate seed
    leaves its rows out of the results it writes; its files stay). A distiller named in both must keep its settings: its stages are keyed by its
    kind, so new settings would reuse the old artifacts (``distiller_settings_check`` guards a distiller
    that was dropped and comes back).
    """
    a, b = yaml.safe_load(text), yaml.safe_load(other)
    naive = [{"kind": NAIVE}]
    da = {d["kind"]: d for d in a.pop("distillers", naive)}
    db = {d["kind"]: d for d in b.pop("distillers", naive)}
    if any(da[k] != db[k] for k in da.keys() & db.keys()):
        return False
    for key in DISTILLER_KEYS[1:]:
        a.pop(key, None)
        b.pop(key, None)
    return a == b
