"""What the server checks: a driver's Hello against the policy, observations, served actions.

Pure functions over numpy and the protocol's wire types, so each rule is tested on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qc_robot import protocol as _P
from qc_robot.policies.base import PolicySpec
from qc_robot.protocol import Hello, PendingImage, ProtocolError, Transition, check_obs_spec

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
        elif _exact_dtype(f.dtype) and np.dtype(dtype) != np.dtype(f.dtype):
            problems.append(f"observation {f.key!r}: policy expects {f.dtype} (an image), driver sends {dtype}")
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


def check_observation(spec: PolicySpec, obs: dict[str, Any]) -> dict[str, Any]:
    """The policy's observation fields, cast to their dtypes; ValueError names what is wrong.
    A JPEG image not decoded yet (``PendingImage``, its headers already checked against the
    declared shape) is kept as it is if that is the field's shape and the field is uint8."""
    out: dict[str, Any] = {}
    for f in spec.obs_fields:
        if f.key not in obs:
            raise ValueError(f"observation lacks key {f.key!r} (got {sorted(map(repr, obs))})")
        v = obs[f.key]
        if isinstance(v, PendingImage):
            if v.shape != tuple(f.shape) or np.dtype(f.dtype) != np.uint8:
                raise ValueError(f"observation {f.key!r}: a JPEG of {list(v.shape)}, expected {f.dtype}{list(f.shape)}")
            out[f.key] = v
            continue
        if not isinstance(v, np.ndarray):
            raise ValueError(f"observation {f.key!r} is not an array")
        if v.shape != tuple(f.shape):
            raise ValueError(f"observation {f.key!r} has shape {list(v.shape)}, expected {list(f.shape)}")
        if v.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"observation {f.key!r} has non-numeric dtype {v.dtype}")
        _check_exact_dtype(f"observation {f.key!r}", f.dtype, v)
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise ValueError(f"observation {f.key!r} contains NaN or inf")
        out[f.key] = v.astype(f.dtype, copy=False)
    return out


def _exact_dtype(dtype: str) -> bool:
    """Integer fields (uint8 images) must arrive in exactly their dtype: a cast from float
    would wrap or truncate values silently. Float fields accept any numeric dtype, cast."""
    return np.dtype(dtype).kind in "iu"


def _check_exact_dtype(where: str, want: str, v: np.ndarray) -> None:
    if _exact_dtype(want) and v.dtype != np.dtype(want):
        raise ValueError(f"{where} has dtype {v.dtype}, expected {want} (images are uint8 HWC RGB)")


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


def check_transition(spec: PolicySpec, tr: Transition) -> Transition:
    """``tr`` checked against the served spec, keeping only the policy's observation keys, cast to
    their dtypes (actions/rewards float32); ValueError names the first bad field.

    Checked: K > 0 rows everywhere; actions (K, A) with the policy's A; rewards and timestamps
    (K,); flags (terminals, truncated, intervention, held) (K,) bool; obs and next_obs hold every policy key with shape (K, *shape) and a numeric dtype;
    every float is finite; ``reward`` (the rewards' convention) is '' or a short name. Extra observation keys are dropped (as for observations)."""
    a = tr.actions
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"transition.actions must be (K, A) with K > 0, got shape {list(a.shape)}")
    k = a.shape[0]
    if a.shape[1] != spec.action_dim:
        raise ValueError(f"transition.actions has {a.shape[1]} columns, the policy's action_dim is {spec.action_dim}")
    _numeric_finite("transition.actions", a)
    _numeric_finite("transition.rewards", tr.rewards)
    if tr.rewards.shape != (k,):
        raise ValueError(f"transition.rewards must have shape ({k},), got {list(tr.rewards.shape)}")
    for name in ("terminals", "truncated", "intervention", "held"):
        v = getattr(tr, name)
        if v is None:
            continue
        if v.shape != (k,) or v.dtype != np.bool_:
            raise ValueError(f"transition.{name} must be bool of shape ({k},), got {v.dtype}{list(v.shape)}")
    if len(tr.reward) > 32 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in tr.reward):
        raise ValueError(f"transition.reward must be a short name such as 'sparse' (or ''), got {tr.reward[:40]!r}")
    if tr.timestamps is not None:
        if tr.timestamps.shape != (k,):
            raise ValueError(f"transition.timestamps must have shape ({k},), got {list(tr.timestamps.shape)}")
        _numeric_finite("transition.timestamps", tr.timestamps)
    obs = {which: _check_rows(spec, getattr(tr, which), k, f"transition.{which}") for which in ("obs", "next_obs")}
    return dataclasses.replace(tr, obs=obs["obs"], next_obs=obs["next_obs"], actions=a.astype(np.float32),
                               rewards=tr.rewards.astype(np.float32))


def _numeric_finite(where: str, v: np.ndarray) -> None:
    if v.dtype.kind not in "biuf":
        raise ValueError(f"{where} has non-numeric dtype {v.dtype}")
    if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
        raise ValueError(f"{where} contains NaN or inf")


def _check_rows(spec: PolicySpec, obs: dict[str, Any], k: int, where: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in spec.obs_fields:
        if f.key not in obs:
            raise ValueError(f"{where} lacks key {f.key!r} (got {sorted(map(repr, obs))})")
        v = obs[f.key]
        if not isinstance(v, np.ndarray) or v.shape != (k, *f.shape):
            got = list(v.shape) if isinstance(v, np.ndarray) else type(v).__name__
            raise ValueError(f"{where}[{f.key!r}] must have shape {[k, *f.shape]}, got {got}")
        _numeric_finite(f"{where}[{f.key!r}]", v)
        _check_exact_dtype(f"{where}[{f.key!r}]", f.dtype, v)
        out[f.key] = v.astype(f.dtype, copy=False)
    return out


def auto_message_limit(spec: Any) -> int:
    """The driver port's message size limit for a policy: room for a transition of 4·H steps
    (obs and next_obs, 4× headroom for extra keys), at least 1 MiB, at most the protocol's 64 MiB.
    A lower limit than the protocol's keeps one peer's huge messages from stalling the loop."""
    obs_bytes = sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in spec.obs_fields)
    step = 2 * obs_bytes + 4 * spec.action_dim + 64
    return int(min(_P.MAX_MESSAGE_BYTES, max(1 << 20, 4 * 4 * spec.chunk_len * step)))
