"""What a log says about each parameter: its error profile, a range, or "not identifiable".

At the fitted parameters, each kind is moved alone (others held) outward in fit coordinates until
the replay error exceeds ``(1 + tol)`` times the fitted one. Where it does on both sides, the
parameter is identified and its range is the profile interval, widened to at least the
Jacobian's ``±range_k`` standard errors and ``±range_min_frac`` (the floor that training's domain
randomization needs anyway). Where the error stays flat to the end of the tested span on a side
(or to the kind's bound, from a fit that is not at it), the log does not pin the parameter down
on that side: the range runs to the end of the span and the report says so, with the excitation
that would make it identifiable.

Profiles hold the other parameters fixed, so correlated parameters (kp against damping) look
better determined than they are; the ±range_k·se term, which includes the correlations, is the
guard against that. Friction, given ``refit``, is profiled properly: the other parameters are
re-fitted at each of its values. Coulomb friction makes the error a staircase in its value, and a
slice through a fit that stopped a step away from the truth can exclude it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qc_robot.calibration.randomization import PARAM_KINDS, from_fit, to_fit

SCALE_STEPS = (0.1, 0.35, 0.7)
"""Profile offsets in log coordinates: x1.1, x1.4, x2 (and their inverses)."""
VALUE_STEPS = (0.1, 0.35, 0.7, 1.4, 2.2)
"""Profile offsets in log1p coordinates for friction: +0.1, +0.4, +1, +3, +8 N*m."""

EXCITATION_HINT = {
    "kp": "larger tracking errors under load: larger step amplitude (excite amplitude) and poses where "
          "gravity loads the shoulder and elbow",
    "damping": "faster joint motion: larger amplitude or less smoothing (damping acts on joint velocity)",
    "armature": "higher accelerations: less smoothing (e.g. 0.3) and fast reversals (armature acts on "
                "joint acceleration)",
    "frictionloss": "slow motions and reversals near zero velocity, and holds (Coulomb friction shows "
                    "at low speed, where the servo torque is small)",
}


def profile(err: Callable[[dict[str, float]], float], params: Mapping[str, float], kind: str, threshold: float,
            refine: int = 0) -> dict[str, Any]:
    """Walk ``kind`` outward on each side until ``err`` exceeds ``threshold``: the interval of values
    still under it (bounded by the first value over it) and the points evaluated. ``refine`` > 0
    bisects each crossing that many times in fit coordinates, keeping the bound at a value known
    to be over the threshold (the interval only shrinks towards values the log rules out)."""
    steps = VALUE_STEPS if PARAM_KINDS[kind].mode == "value" else SCALE_STEPS
    z0 = to_fit(kind, params[kind])
    points: list[list[float]] = []
    ends, closed = [], []
    for sign in (-1.0, 1.0):
        end, hit, last = from_fit(kind, z0 + sign * steps[-1]), False, params[kind]
        under = 0.0  # the farthest offset (fit coordinates) known to be under the threshold
        for s in steps:
            v = from_fit(kind, z0 + sign * s)
            if abs(v - last) < 1e-12:  # at the kind's bound: the range ends there. A fit at the bound
                # (within the first step) leaves nothing unknown on that side; a walk that reached it
                # from farther with the error still under the threshold has not pinned it down there
                end, hit = v, abs(to_fit(kind, v) - z0) <= steps[0] + 1e-9
                break
            last = v
            e = err({**params, kind: v})
            points.append([v, e])
            if e > threshold:
                end, hit = v, True
                over = s
                for _ in range(refine):  # the crossing lies in (under, over)
                    mid = 0.5 * (under + over)
                    vm = from_fit(kind, z0 + sign * mid)
                    em = err({**params, kind: vm})
                    points.append([vm, em])
                    if em > threshold:
                        over, end = mid, vm
                    else:
                        under = mid
                break
            under = s
        ends.append(end)
        closed.append(hit)
    return {"interval": [min(ends), max(ends)], "closed": closed, "points": sorted(points)}


def describe(kind: str, value: float) -> str:
    """``value`` of ``kind`` in its unit, to 3 significant digits: '0.2 N·m', 'x1.02 nominal'."""
    if PARAM_KINDS[kind].mode == "value":
        return f"{value:.3g} N·m"
    return f"x{value:.3g} nominal"


def describe_range(kind: str, lo: float, hi: float) -> str:
    """'[0, 3.87] N·m' or '[x0.9, x1.1] nominal'."""
    if PARAM_KINDS[kind].mode == "value":
        return f"[{lo:.3g}, {hi:.3g}] N·m"
    return f"[x{lo:.3g}, x{hi:.3g}] nominal"


def assess(err: Callable[[dict[str, float]], float], params: Mapping[str, float], sigma: Mapping[str, float],
           kinds: Sequence[str], err_min: float, range_k: float = 3.0, range_min_frac: float = 0.1,
           tol: float = 0.1, profile: bool = True, abs_tol: float = 2e-3,
           refit: Callable[[dict[str, float], str], float] | None = None, refine: int = 3) -> dict[str, Any]:
    """``{"ranges": kind -> [lo, hi], "report": kind -> {...}}`` (see the module docstring).

    ``err(params)`` is the normalised RMS replay error; ``err_min`` its value at the fit.
    ``refit(params, kind)``, when given, is the error with ``kind`` held at ``params[kind]`` and
    the other kinds re-fitted: the value kinds (friction) are profiled with it instead of ``err``.
    ``refine``: bisections of each value kind's crossing (its steps are coarse: +0.4, +1, +3 N·m)."""
    threshold = max(err_min * (1 + tol), err_min + abs_tol)
    ranges: dict[str, list[float]] = {}
    report: dict[str, Any] = {"threshold": threshold, "tol": tol}
    for k in kinds:
        s = float(sigma.get(k, 0.0))
        half = max(range_k * (s if np.isfinite(s) else 0.0), float(np.log1p(range_min_frac)))
        z = to_fit(k, params[k])
        lo, hi = from_fit(k, z - half), from_fit(k, z + half)
        entry: dict[str, Any] = {"value": params[k], "se_range": [lo, hi]}
        if profile:
            by = err if refit is None or PARAM_KINDS[k].mode != "value" else (lambda p, k=k: refit(p, k))
            pr = _profile(by, params, k, threshold, refine if PARAM_KINDS[k].mode == "value" else 0)
            pr["refit"] = by is not err
            lo, hi = min(lo, pr["interval"][0]), max(hi, pr["interval"][1])
            entry.update(pr)
            entry["identifiable"] = bool(all(pr["closed"]))
            if not entry["identifiable"]:
                side = " and ".join(n for n, c in zip(("below", "above"), pr["closed"], strict=True) if not c)
                others = " with the other parameters re-fitted" if pr["refit"] else ""
                entry["statement"] = (f"{k} ({describe(k, params[k])}) is not identifiable from this log {side} "
                                      f"its fit: the replay error stays under {threshold:.2g} (the fit's "
                                      f"{err_min:.2g} + {threshold - err_min:.2g}){others} for {k} in "
                                      f"{describe_range(k, *pr['interval'])}; to identify it log "
                                      f"{EXCITATION_HINT[k]}")
        entry["range"] = [lo, hi]
        ranges[k] = [lo, hi]
        report[k] = entry
    return {"ranges": ranges, "report": report}


_profile = profile
