"""What the server checks: a driver's Hello against the policy, observations, served actions.

Pure functions over numpy and the protocol's wire types, so each rule is tested on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.base import PolicySpec
from qc_robot.protocol import Hello, ProtocolError, Transition, check_obs_spec

_NUMERIC_KINDS = "biuf"


def check_hello(spec: PolicySpec, hello: Hello) -> tuple[list[str], list[str]]:
    """``(problems, warnings)``: any problem refuses the driver (``spec_mismatch``)."""
    problems: list[str] = []
    warnings: list[str] = []
    try:
        offered = {k: (shape, dtype) for k, shape, dtype in check_obs_spec(hello.obs_spec)}
    except ProtocolError as e:
        return [str(e)], warnings
    for f in spec.obs_fields:
        if f.key not in offered:
            problems.append(f"policy needs observation {f.key!r} {list(f.shape)}, driver offers {sorted(offered)}")
            continue
        shape, dtype = offered[f.key]
        if tuple(shape) != tuple(f.shape):
            problems.append(f"observation {f.key!r}: policy expects shape {list(f.shape)}, driver sends {list(shape)}")
        if np.dtype(dtype).kind not in _NUMERIC_KINDS:  # pragma: no cover - allow-list is numeric
            problems.append(f"observation {f.key!r}: dtype {dtype} is not numeric")
    if hello.action_dim != spec.action_dim:
        problems.append(f"action_dim: policy {spec.action_dim}, driver {hello.action_dim}")
    elif hello.action_low.shape != (spec.action_dim,) or hello.action_high.shape != (spec.action_dim,):
        problems.append(f"driver action limits must have shape ({spec.action_dim},)")
    else:
        lo, hi = hello.action_low.astype(np.float64), hello.action_high.astype(np.float64)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
            problems.append("driver action limits are not finite with low <= high")
        elif np.any(spec.action_high < lo) or np.any(spec.action_low > hi):
            problems.append(f"action ranges do not overlap: policy [{spec.action_low}, {spec.action_high}], "
                            f"driver [{lo}, {hi}]")
        elif np.any(spec.action_low < lo - 1e-6) or np.any(spec.action_high > hi + 1e-6):
            warnings.append("driver action limits are narrower than the policy's: the driver will clip")
    if spec.control_hz > 0 and abs(hello.control_hz - spec.control_hz) > 1e-6 * spec.control_hz:
        problems.append(f"control rate: policy trained at {spec.control_hz} Hz, driver runs {hello.control_hz} Hz")
    return problems, warnings


def check_observation(spec: PolicySpec, obs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The policy's observation fields, cast to their dtypes; ValueError names what is wrong."""
    out: dict[str, np.ndarray] = {}
    for f in spec.obs_fields:
        if f.key not in obs:
            raise ValueError(f"observation lacks key {f.key!r} (got {sorted(obs)})")
        v = obs[f.key]
        if not isinstance(v, np.ndarray):
            raise ValueError(f"observation {f.key!r} is not an array")
        if v.shape != tuple(f.shape):
            raise ValueError(f"observation {f.key!r} has shape {list(v.shape)}, expected {list(f.shape)}")
        if v.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"observation {f.key!r} has non-numeric dtype {v.dtype}")
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise ValueError(f"observation {f.key!r} contains NaN or inf")
        out[f.key] = v.astype(f.dtype, copy=False)
    return out


def sanitize_actions(spec: PolicySpec, actions: Any) -> tuple[np.ndarray, int]:
    """``(actions clipped to the limits as float32 (H, A), number of clipped elements)``.

    Raises ValueError for a wrong shape or any NaN/inf: such a chunk is never served.
    """
    a = np.asarray(actions)
    if a.shape != (spec.chunk_len, spec.action_dim):
        raise ValueError(f"policy returned actions of shape {list(a.shape)}, expected "
                         f"{[spec.chunk_len, spec.action_dim]}")
    if a.dtype.kind not in "iuf" or not np.all(np.isfinite(a)):
        raise ValueError("policy returned NaN/inf or non-numeric actions")
    a = a.astype(np.float32)
    clipped = np.clip(a, spec.action_low, spec.action_high)  # (H, A)
    return clipped, int(np.count_nonzero(clipped != a))


def check_transition(tr: Transition) -> None:
    """Raise ValueError unless ``tr``'s arrays agree on K (the learner relies on it)."""
    k = len(tr.actions)
    if tr.actions.ndim != 2 or k == 0:
        raise ValueError("transition actions must be (K, A) with K > 0")
    for name in ("rewards", "terminals", "truncated"):
        if getattr(tr, name).shape != (k,):
            raise ValueError(f"transition {name} must have shape ({k},)")
    for name in ("intervention", "timestamps", "held"):
        if getattr(tr, name) is not None and getattr(tr, name).shape != (k,):
            raise ValueError(f"transition {name} must have shape ({k},)")
    if set(tr.obs) != set(tr.next_obs) or any(len(v) != k for v in [*tr.obs.values(), *tr.next_obs.values()]):
        raise ValueError("transition obs/next_obs need the same keys and K rows")
