"""The owner's-regime calibration's pieces on stand-in accuracy curves (no model): base τ, λ search,
interpolation, the design read back from calibration.json, and config validation."""

from __future__ import annotations

import json
import math

import pytest

from antidistill.experiment.calibration import (
    CalibrationConfig,
    Design,
    base_temperature,
    interpolate_params,
    outside_picks,
    search_gamma,
    search_lambda,
)


def test_interpolation_is_linear_on_the_monotone_curve_and_flags_the_ends():
    picks = interpolate_params([0.5, 1.0, 1.5], [0.9, 0.7, 0.3], [0.8, 0.5, 0.95, 0.1])
    assert [p["param"] for p in picks] == pytest.approx([0.75, 1.25, 0.5, 1.5])
    assert [p["inside_measured_range"] for p in picks] == [True, True, False, False]
    # a noisy bump is flattened (running minimum), so the curve never rises with the parameter
    assert interpolate_params([1, 2, 3], [0.8, 0.6, 0.7], [0.65])[0]["param"] == pytest.approx(1.75)


def test_log_interpolation_takes_the_geometric_midpoint():
    pick = interpolate_params([0.01, 0.04], [0.9, 0.7], [0.8], log=True)[0]
    assert pick["param"] == pytest.approx(0.02)


def test_base_temperature_is_the_largest_tau_within_tolerance_of_greedy():
    tau, why = base_temperature([0.2, 0.4, 0.6, 0.8], [0.90, 0.895, 0.87, 0.80], best=0.90, tolerance=0.01)
    assert tau == pytest.approx(0.4 + 0.2 * (0.895 - 0.89) / (0.895 - 0.87)) and "within 1 points" in why
    tau, why = base_temperature([0.2, 0.4], [0.85, 0.80], best=0.90, tolerance=0.01)
    assert tau == 0.2 and "even the smallest" in why


def test_lambda_search_brackets_every_target_and_refines_inside():
    calls = []

    def measure(lam):  # a smooth stand-in: 90% at λ → 0, 50% at λ = 0.1
        calls.append(lam)
        return 0.9 - 0.4 * lam / (lam + 0.1)

    targets = [0.88, 0.85, 0.80, 0.70]
    curve = search_lambda(measure, targets, (1e-3, 10.0), 2.5, refine=2)
    assert min(curve.values()) < 0.70  # the grid went past the deepest target, then stopped
    assert max(curve) < 10.0 and len(calls) == len(set(calls)) == len(curve)
    for t, pick in zip(targets, interpolate_params(list(curve), list(curve.values()), targets, log=True)):
        exact = 0.1 * (0.9 - t) / (0.4 - (0.9 - t))  # the stand-in inverted
        assert pick["inside_measured_range"] and math.isclose(pick["param"], exact, rel_tol=0.15)


def test_lambda_grid_is_the_geometric_one_rounded_step_by_step():
    calls = []
    search_lambda(lambda lam: calls.append(lam) or 0.9, [0.5], (1e-4, 10.0), 2.5, refine=0)
    lam, grid = 1e-4, []
    while lam <= 10.0 * (1 + 1e-9):
        lam = float(f"{lam:.6g}")
        grid.append(lam)
        lam *= 2.5
    assert calls == grid  # never fell below the target: the whole grid, each value rounded before the next step


def test_gamma_search_brackets_every_target_and_bisects_linearly():
    calls = []

    def measure(gamma):  # a stand-in: 90% at γ = 0, falling linearly then faster
        calls.append(gamma)
        return 0.9 - 0.3 * gamma - 0.4 * gamma**2

    targets = [0.85, 0.75]
    curve = search_gamma(measure, targets, [0.0, 0.25, 0.5, 0.75, 1.0], refine=3)
    assert calls[:3] == [0.0, 0.25, 0.5]  # the grid stops once below the deepest target (0.9 − 0.25 = 0.65 at 0.5)
    assert 0.75 not in curve and len(calls) == len(set(calls)) == len(curve)
    # bisections are arithmetic midpoints inside a bracket
    assert 0.125 in curve and all(0.0 <= g <= 0.5 for g in curve)
    for t, pick in zip(targets, interpolate_params(list(curve), list(curve.values()), targets)):
        exact = (-0.3 + math.sqrt(0.09 + 1.6 * (0.9 - t))) / 0.8  # the stand-in inverted
        assert pick["inside_measured_range"] and abs(pick["param"] - exact) < 0.01


def test_gamma_search_that_never_reaches_the_target_ends_at_one():
    curve = search_gamma(lambda g: 0.9 - 0.05 * g, [0.5], [0.0, 0.5, 1.0], refine=2)
    assert list(curve) == [0.0, 0.5, 1.0]
    assert interpolate_params(list(curve), list(curve.values()), [0.5])[0] == {
        "target_acc": 0.5, "param": 1.0, "inside_measured_range": False}


def _calibration_file(tmp_path, chosen):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"chosen": chosen, "base_tau": 0.35}))
    return path


def test_design_reads_targets_grid_and_base_tau(tmp_path):
    path = _calibration_file(tmp_path, {
        "temperature": [{"target": -2, "param": 0.5, "inside_measured_range": True},
                        {"target": -5, "param": 0.7, "inside_measured_range": True}],
        "antidistill": [{"target": -2, "param": 0.01, "inside_measured_range": True},
                        {"target": -5, "param": 0.01, "inside_measured_range": False}]})
    d = Design.load(path)
    assert d.grid == {"temperature": [0.5, 0.7], "antidistill": [0.01]} and d.base_tau == 0.35
    # a value serving −2 and −5 carries the primary target (−5), so the primary endpoint keeps its pair
    assert d.targets[("temperature", 0.7)] == -5 and d.targets[("antidistill", 0.01)] == -5
    assert outside_picks(path) == ["antidistill -5 → 0.01"]


@pytest.mark.parametrize("kw, match", [
    ({"arms": ["antidistill"]}, "must include temperature"),
    ({"arms": ["temperature", "blackbox"]}, "unknown arms"),
    ({"targets": [5.0]}, "points below"),
    ({"targets": []}, "points below"),
    ({"temperatures": [0.5]}, "at least 2"),
    ({"temperatures": [0.0, 1.0]}, "tau"),
    ({"lam_range": (0.1, 0.01)}, "lam_range"),
    ({"lam_factor": 1.0}, "lam_factor"),
    ({"n_holdout": 0}, "n_holdout"),
    ({"gammas": [0.0, 1.5]}, "gamma=1.5"),
    ({"gammas": [0.5, 0.25]}, "gammas needs at least 2 increasing"),
    ({"gammas": [0.5]}, "gammas needs at least 2 increasing"),
])
def test_bad_calibration_configs_are_refused_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CalibrationConfig(**kw)
