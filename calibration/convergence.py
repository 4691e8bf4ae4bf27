"""Has a fit converged? How far its replay error is from the floor the fit could still reach.

A least-squares fit stops when its budget runs out or its steps stop helping; neither means it
reached the bottom of its error. Two measurements at the final point say how far it is:

* **Gauss-Newton floor**: the error the linearised model predicts after one full Gauss-Newton
  step from the fit (``min_d |r + J d|`` with the fit's own Jacobian ``J`` and residuals ``r``).
  At a minimum the residuals are orthogonal to ``J``'s columns and the floor equals the error;
  a fit stopped on a slope (a budget that ran out, a valley walked too slowly) has a floor below
  it. Noise in a real robot's log is orthogonal to ``J`` as well, so the floor is then the noise
  level, not zero: the test is relative to what the fit could still remove, not to 1e-8.
* **Profiles** (``qc_robot.calibration.identifiability``): a profile point with a lower error
  than the fit's is a better fit the local stage did not find (friction's staircase does this).

The fit is **converged** when its error is within ``max(0.5 x best, rtol x error_before)`` of the
best error known to be reachable (``best``: the floor, or a profile point's error when lower): it
has removed all but ``rtol`` (0.1 %) of the nominal model's error that a step from it, or a
profile, could still remove. Otherwise the report says
so and what to add: evaluations when a solver ran out of them, a wider global search when a
lower point exists elsewhere, excitation for the parameters the log does not identify.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RTOL = 1e-3
"""Part of the nominal model's error a converged fit may leave above its floor."""
PROFILE_TOL = 0.1
"""A profile point this much (relative) below the fit's error means a better fit exists."""


def gauss_newton_floor(jac: np.ndarray, r: np.ndarray) -> float:
    """Normalised RMS error after one unbounded Gauss-Newton step from the point ``(jac, r)``."""
    if jac.size == 0 or len(r) == 0:
        return float(np.sqrt(np.mean(np.square(r)))) if len(r) else 0.0
    d, *_ = np.linalg.lstsq(jac, -r, rcond=1e-10)
    return float(np.sqrt(np.mean(np.square(r + jac @ d))))


def assess_convergence(error: float, floor: float, error_before: float, identifiability: Mapping[str, Any],
                       kinds: Sequence[str], budget_exhausted: bool, max_iters: int, global_evals: int,
                       rtol: float = RTOL) -> dict[str, Any]:
    """The ``convergence`` entry of a fit report (see the module docstring)."""
    from qc_robot.calibration.identifiability import EXCITATION_HINT, describe

    lower: dict[str, Any] | None = None
    for k in kinds:
        for v, e in identifiability.get(k, {}).get("points", []):
            if e < (1 - PROFILE_TOL) * error and (lower is None or e < lower["error"]):
                lower = {"kind": k, "value": float(v), "error": float(e)}
    best = min(floor, lower["error"]) if lower is not None else floor
    slack = max(0.5 * best, rtol * error_before)
    converged = error <= best + slack
    if converged:
        lower = None  # within the allowed gap of it: not worth reporting
    advice: list[str] = []
    if not converged:
        if budget_exhausted:
            advice.append(f"raise max_iters (now {max_iters}) to {2 * max_iters}")
        if lower is not None or not budget_exhausted:
            advice.append(f"raise global_evals (now {global_evals}) to {max(2 * global_evals, 480)} or set starts=4")
    unidentified = [k for k in kinds if identifiability.get(k, {}).get("identifiable") is False]
    for k in unidentified:
        advice.append(f"log excitation for {k}: {EXCITATION_HINT[k]}")
    if converged:
        summary = f"converged: replay error {error:.3g}, floor {floor:.3g} (a Gauss-Newton step from the fit)"
    else:
        why = (f"a profile reached {lower['error']:.3g} at {lower['kind']} = {describe(lower['kind'], lower['value'])}"
               if lower is not None else f"a Gauss-Newton step from the fit predicts {floor:.3g}")
        summary = (f"NOT CONVERGED: replay error {error:.3g}, {why} (allowed gap {slack:.2g}); "
                   + "; ".join(advice[: 2 if budget_exhausted and lower is not None else 1]))
    return {"converged": bool(converged), "error": float(error), "floor": float(floor), "slack": float(slack),
            "lower_point": lower, "budget_exhausted": bool(budget_exhausted), "unidentified": unidentified,
            "advice": advice, "summary": summary}
