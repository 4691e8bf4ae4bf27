"""What ``qc-robot calibrate`` tells a user (issue 28): identifiability in the parameter's own unit,
friction ranges bisected to where the log rules values out. Pure functions on hand-built error
surfaces: fast, no simulator; sysid's convergence report on a real MuJoCo fit through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qc_robot.calibration.identifiability import assess, describe, describe_range, profile

TASK = "cube-single-task1"


def test_unidentified_friction_is_reported_in_newton_metres_not_a_huge_percentage() -> None:
    """A fit at the error floor (1e-8) with a flat friction profile: the former message read
    'stays within 7182637 % of the fit's'."""
    params = {"kp": 1.0, "damping": 1.0, "armature": 1.0, "frictionloss": 0.0}
    out = assess(lambda p: 1e-8, params, {"frictionloss": 0.01}, ["frictionloss"], 1e-8)
    entry = out["report"]["frictionloss"]
    assert entry["identifiable"] is False
    text = entry["statement"]
    assert "%" not in text, text
    assert "frictionloss (0 N·m) is not identifiable from this log above its fit" in text, text
    assert "stays under 0.002 (the fit's 1e-08 + 0.002)" in text and "in [0, 8.03] N·m" in text, text
    assert "slow motions" in text  # the excitation that would identify it


def test_friction_range_is_bisected_to_the_crossing_and_keeps_the_truth() -> None:
    """Error 0.02 per N·m away from a true 0.2 N·m (threshold 0.002 above the floor): the values the
    log allows are [0.1, 0.3]. The coarse walk (+0.1, +0.4, ... in log1p) stops at its first point
    over the threshold; three bisections bring each end within a few hundredths of the crossing."""
    truth = 0.2
    params = {"frictionloss": truth}

    def err(p: dict[str, float]) -> float:
        return 1e-8 + 0.02 * abs(p["frictionloss"] - truth)

    coarse = profile(err, params, "frictionloss", 1e-8 + 2e-3)
    fine = profile(err, params, "frictionloss", 1e-8 + 2e-3, refine=3)
    (lo_c, hi_c), (lo_f, hi_f) = coarse["interval"], fine["interval"]
    assert lo_c <= lo_f < 0.1 < truth < 0.3 < hi_f <= hi_c, (coarse["interval"], fine["interval"])
    assert hi_f - lo_f < hi_c - lo_c
    assert 0.3 < hi_f < 0.32 and 0.08 < lo_f < 0.1, fine["interval"]
    assert all(fine["closed"])
    for v, e in fine["points"]:  # every evaluated point is on the surface (the ends are over it)
        assert np.isclose(e, err({"frictionloss": v}))


def test_values_are_written_in_their_unit_to_three_significant_digits() -> None:
    assert describe("frictionloss", 0.0001234) == "0.000123 N·m"
    assert describe("kp", 1.0234567) == "x1.02 nominal"
    assert describe_range("frictionloss", 0.0, 3.866) == "[0, 3.87] N·m"
    assert describe_range("damping", 0.9, 1.1) == "[x0.9, x1.1] nominal"


# -- sysid convergence ------------------------------------------------------------------------------


def test_gauss_newton_floor_is_the_error_at_a_minimum_and_below_it_elsewhere() -> None:
    from qc_robot.calibration.convergence import assess_convergence, gauss_newton_floor

    rng = np.random.default_rng(0)
    jac = rng.normal(size=(200, 3))
    noise = 0.01 * rng.normal(size=200)
    y = jac @ np.array([1.0, -2.0, 0.5]) + noise

    def residual(x: np.ndarray) -> np.ndarray:
        return jac @ x - y

    x_best, *_ = np.linalg.lstsq(jac, y, rcond=None)
    at_min, off = residual(x_best), residual(x_best + np.array([0.05, 0.0, 0.0]))
    rms_min = float(np.sqrt(np.mean(at_min**2)))
    assert np.isclose(gauss_newton_floor(jac, at_min), rms_min)  # the noise level, not zero
    assert np.isclose(gauss_newton_floor(jac, off), rms_min)
    rms_off = float(np.sqrt(np.mean(off**2)))
    kinds = ["kp"]
    ok = assess_convergence(rms_min, rms_min, 1.0, {}, kinds, False, 30, 480)
    bad = assess_convergence(rms_off, rms_min, 1.0, {}, kinds, True, 30, 480)
    assert ok["converged"] and ok["summary"].startswith("converged")
    assert not bad["converged"] and bad["summary"].startswith("NOT CONVERGED")
    assert "raise max_iters (now 30) to 60" in bad["summary"]
    # a profile point well below the fit's error: a better fit exists, whatever the floor says
    lower = assess_convergence(rms_min, rms_min, 1.0, {"kp": {"points": [[0.9, 0.5 * rms_min]]}}, kinds, False, 30, 480)
    assert not lower["converged"] and "a profile reached" in lower["summary"] and "global_evals" in lower["summary"]


def _hidden_robot_log(tmp_path: Path, params: dict[str, float], steps: int = 20) -> str:
    from qc_robot.calibration.cli import CalibrateConfig, run_calibrate
    from qc_robot.calibration.files import Calibration, save_calibration

    robot = save_calibration(Calibration("hidden", TASK, physics={"params": params, "ranges": {},
                                                                  "control_delay_steps": 1}), tmp_path / "hidden.json")
    data = str(tmp_path / "excite.hdf5")
    assert run_calibrate(CalibrateConfig(step="excite", robot_id="arm1", task=TASK, dataset=data, realtime=True,
                                         time_scale=2.0, episodes=1, steps=steps, seed=3,
                                         driver_args={"calibration": str(robot)})) == 0
    return data


def test_sysid_says_not_converged_and_require_converged_exits_3(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Real MuJoCo, the CLI: a fit starved of evaluations says so, names the budget to add and, with
    require_converged=true, exits 3 writing nothing; given the budget, the same log converges."""
    from qc_robot.calibration.cli import CalibrateConfig, run_calibrate
    from qc_robot.calibration.files import load_calibration

    data = _hidden_robot_log(tmp_path, {"kp": 0.7, "damping": 1.0, "armature": 1.0, "frictionloss": 0.0})
    out = tmp_path / "arm1.json"
    common = dict(step="sysid", robot_id="arm1", task=TASK, dataset=data, out=str(out), episodes=1, steps=20,
                  profile=False, kinds=["kp"])
    capsys.readouterr()
    rc = run_calibrate(CalibrateConfig(global_evals=0, max_iters=1, require_converged=True, **common))  # type: ignore[arg-type]
    text = capsys.readouterr().out
    assert rc == 3, text
    assert "sysid NOT CONVERGED" in text and "raise max_iters (now 1) to 2" in text, text
    assert "not written" in text and not out.exists()
    rc = run_calibrate(CalibrateConfig(global_evals=0, max_iters=1, **common))  # type: ignore[arg-type]
    assert rc == 0 and not load_calibration(out).physics["fit"]["convergence"]["converged"]  # type: ignore[index]
    capsys.readouterr()
    rc = run_calibrate(CalibrateConfig(global_evals=0, max_iters=30, require_converged=True, **common))  # type: ignore[arg-type]
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "sysid converged" in text, text
    fit = load_calibration(out).physics["fit"]  # type: ignore[index]
    assert fit["convergence"]["converged"] and fit["error_after"] < 1e-4, fit["convergence"]
