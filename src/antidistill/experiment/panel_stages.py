"""The sweep's stages for the proxy zoo and the student panel (issue 16).

An arm ``<arm>@<name>`` (``arms.arm_spec``) runs with a named model of the toy world's zoo as its proxy:
its g is made once per run under ``gradients/<name>.safetensors`` (``rundir.RunDir.named_gradient``). Each
point's traces are distilled into every panel student besides the base student (whose stages are the
point's own): ``points/<point>/panel/<name>/`` holds that student, its test rows and its row
(``rundir.PanelDir``). Every row is labelled with its proxy and student (:meth:`PanelStages.labels`).
Every artifact goes through ``rundir.stage``, so resuming redoes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..gradient import compute_proxy_gradient, save_gradient
from ..io_utils import read_jsonl, write_json_atomic
from ..proxy import load_causal_lm
from .arms import arm_spec
from .distiller_stages import with_distiller
from .rundir import stage


class PanelStages:
    """The zoo's and the panel's stages of one :class:`~antidistill.experiment.sweep.Run`."""

    def __init__(self, run):
        self.run = run
        self.cfg = run.cfg

    def model_path(self, name: str) -> str:
        """The folder of a named proxy or student of the toy world (``ToyWorldConfig.named_specs``)."""
        named = self.run.materials.named_paths
        if name not in named:
            raise ValueError(f"no model named {name!r} in this world; it has {sorted(named)}")
        return named[name]

    def gradient_path(self, method: str) -> Path | None:
        """g of arm ``method``'s proxy (None for an arm without one): the shipped proxy's, the base student's
        (white-box), or a named zoo proxy's or panel student's (``<arm>@<name>``), made once per run."""
        proxy = arm_spec(method).proxy
        zoo = self.cfg.world.zoo_or_default()
        if proxy is None:
            return None
        if proxy == "ensemble":  # one g per member, each its single-proxy arm's
            return [self.gradient_path(f"antidistill@{p}") for p in self.cfg.ensemble_members(method)]
        if proxy in ("proxy", zoo.shipped_proxy):
            return self.run.gradient_path()
        if proxy in ("student", zoo.base_student):
            return self.run.whitebox_gradient_path()

        def make(path):
            result = compute_proxy_gradient(load_causal_lm(self.model_path(proxy)), self.run.tok["teacher"],
                                            self.run.holdout_traces(), progress=self.run.progress)
            save_gradient(path, result, extra={"run": self.cfg.name, "proxy": proxy})
        path = self.run.files.named_gradient(proxy)
        path.parent.mkdir(parents=True, exist_ok=True)
        return stage(path, make)

    def proxy_of(self, method: str):
        """Arm ``method``'s named proxy (``<arm>@<name>``): the model, its g's path, and its tokenizer (the toy
        world's one tokenizer). An ensemble arm: the list of its members and the list of their g's paths."""
        if arm_spec(method).proxy == "ensemble":
            members = self.cfg.ensemble_members(method)
            return [load_causal_lm(self.model_path(p)) for p in members], self.gradient_path(method), self.run.tok["proxy"]
        return load_causal_lm(self.model_path(arm_spec(method).proxy)), self.gradient_path(method), self.run.tok["proxy"]

    def row(self, method: str, param: float, seed: int, name: str) -> dict:
        """Run (or reuse) the point's traces distilled into panel student ``name`` (naive distiller); its row."""
        run = self.run
        files = run.files.point(method, param, seed).panel(name)
        if files.result.is_file():
            return json.loads(files.result.read_text())
        settings = run.teacher_stages(method, param, seed)
        files.root.mkdir(parents=True, exist_ok=True)
        stage(files.student, lambda path: run._distill(read_jsonl(files.traces), seed, path,
                                                       start=self.model_path(name)))
        student = load_causal_lm(str(files.student))
        greedy = self.cfg.settings_for("greedy", 0.0, seed)
        stage(files.student_test, run._traces(student, run.tok["student"], "test", greedy,
                                              f"student {name} on test [{method} {param:g} seed {seed}]",
                                              scoring="forced"))
        row = with_distiller(run._result_row(method, param, seed, settings, files, student), "naive")
        write_json_atomic(files.result, row)
        return row

    def rows(self, method: str, param: float, seed: int, base_rows: list[dict]) -> list[dict]:
        """The point's base-student ``base_rows``, then one row per further panel student, each labelled."""
        panel = self.cfg.panel()
        return ([r | self.labels(method, panel[0]) for r in base_rows]
                + [self.row(method, param, seed, s) | self.labels(method, s) for s in panel[1:]])

    def labels(self, method: str, student: str) -> dict:
        """Which proxy made a row's traces and which student learned from them (the transfer matrix's axes):
        ``proxy`` (None for arms without one), ``student``, ``base_student``, and in the toy world each
        model's family and parameter count, and ``proxy_size`` (its spec against the base student's: same,
        smaller or larger)."""
        proxy = arm_spec(method).proxy
        if self.cfg.dataset != "toy":
            name = {"proxy": self.cfg.proxy, "student": self.cfg.student}.get(proxy, proxy)
            return {"proxy": name, "student": student, "base_student": student == self.cfg.panel()[0]}
        world, zoo = self.cfg.world, self.cfg.world.zoo_or_default()
        name = {"proxy": zoo.shipped_proxy, "student": zoo.base_student}.get(proxy, proxy)
        specs, metrics = world.named_specs(), self.run.materials.world_metrics

        def params(n):
            return metrics.get(f"{specs[n][1].replace('/', '_')}_params")

        out = {"proxy": name, "student": student, "base_student": student == zoo.base_student,
               "student_family": specs[student][2].family, "student_params": params(student),
               "proxy_family": None, "proxy_params": None, "proxy_size": None}
        if proxy == "ensemble":  # "ensemble" or "ensemble-<family>"; its families joined, its size "ensemble"
            members = self.cfg.ensemble_members(method)
            left_out = arm_spec(method).exclude_family
            out |= {"proxy": "ensemble" + (f"-{left_out}" if left_out else ""),
                    "proxy_family": "+".join(sorted({specs[p][2].family for p in members})),
                    "proxy_params": sum(params(p) or 0 for p in members), "proxy_size": "ensemble"}
        elif name is not None:
            spec, base = specs[name][2], world.student
            dims = (spec.hidden, spec.layers, spec.heads, spec.intermediate)
            if dims == (base.hidden, base.layers, base.heads, base.intermediate):
                size = "same"
            else:
                size = "smaller" if (params(name) or 0) < (params(zoo.base_student) or 0) else "larger"
            out |= {"proxy_family": spec.family, "proxy_params": params(name), "proxy_size": size}
        return out
