"""What ``qc-robot calibrate`` tells a user (issue 28): identifiability in the parameter's own unit,
friction ranges bisected to where the log rules values out. Pure functions on hand-built error
surfaces: fast, no simulator; sysid's convergence report on a real MuJoCo fit through the CLI.
"""

from __future__ import annotations

import numpy as np

from qc_robot.calibration.identifiability import assess, describe, describe_range, profile


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

