"""Physical parameters of the simulated arm: apply them to a MuJoCo model, sample them per episode.

One value per *kind* over all the arm's joints (few parameters keep system identification cheap
and well posed). The kinds and what they touch in the model (facts from OGBench's manipspace env,
``ManipSpaceEnv.post_compilation``: the UR5e arm is driven by position servos with
``gainprm[0] = kp``, ``biasprm = [0, -kp, -kv]``; its joints have ``damping = 0`` and
``armature = 0.1``; the Robotiq gripper is left alone):

* ``kp`` (scale): servo stiffness, ``gainprm[0]`` and ``-biasprm[1]`` together.
* ``damping`` (scale): all viscous joint damping. The servo's ``kv`` (``-biasprm[2]``) is the only
  damping in the stock model, and joint ``dof_damping`` acts identically (a torque ``-c·qdot``),
  so the two cannot be told apart from data: we scale both.
* ``armature`` (scale): reflected rotor inertia ``dof_armature``.
* ``frictionloss`` (value, N·m): Coulomb friction ``dof_frictionloss`` of every arm joint; the
  stock model has none, so this is an absolute value rather than a scale.

numpy only at import; the model is whatever ``env.unwrapped.model`` is (an ``MjModel``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ParamKind:
    """How one parameter kind is stored and bounded."""

    mode: str
    """'scale' (multiplies the model's nominal values) or 'value' (absolute, same for every joint)."""
    nominal: float
    lower: float
    """Bounds for identification and sampling."""
    upper: float
    unit: str


PARAM_KINDS: dict[str, ParamKind] = {
    "kp": ParamKind("scale", 1.0, 0.2, 5.0, "x nominal"),
    "damping": ParamKind("scale", 1.0, 0.2, 5.0, "x nominal"),
    "armature": ParamKind("scale", 1.0, 0.1, 10.0, "x nominal"),
    "frictionloss": ParamKind("value", 0.0, 0.0, 20.0, "N*m"),
}


def nominal_params() -> dict[str, float]:
    """The stock model: every scale 1, no friction."""
    return {k: v.nominal for k, v in PARAM_KINDS.items()}


def check_params(params: Mapping[str, float], where: str = "params") -> dict[str, float]:
    """``params`` as floats, refusing unknown kinds, non-finite values and values out of bounds."""
    out: dict[str, float] = {}
    for k, v in params.items():
        if k not in PARAM_KINDS:
            raise ValueError(f"{where}: unknown parameter {k!r}; known: {sorted(PARAM_KINDS)}")
        x = float(v)
        kind = PARAM_KINDS[k]
        if not np.isfinite(x):
            raise ValueError(f"{where}.{k} is not finite ({v!r})")
        if not kind.lower <= x <= kind.upper:
            raise ValueError(f"{where}.{k} = {x} is outside [{kind.lower}, {kind.upper}] ({kind.unit})")
        out[k] = x
    return out


def arm_indices(env: Any) -> tuple[np.ndarray, np.ndarray]:
    """(dof indices, actuator indices) of the arm in ``env``'s model.

    OGBench manipspace envs keep them as ``_arm_joint_ids``/``_arm_actuator_ids``; for other
    models, every joint driven by a position servo (affine bias) counts as the arm.
    """
    u = getattr(env, "unwrapped", env)
    model = u.model
    if hasattr(u, "_arm_joint_ids") and hasattr(u, "_arm_actuator_ids"):
        joints = np.asarray(u._arm_joint_ids, int)
        acts = np.asarray(u._arm_actuator_ids, int)
    else:
        acts = np.asarray([i for i in range(model.nu) if model.actuator_biastype[i] == 1
                           and model.actuator_trntype[i] == 0], int)
        joints = np.asarray(model.actuator_trnid[acts, 0], int)
    return np.asarray(model.jnt_dofadr[joints], int), acts


class PhysicsParams:
    """Applies parameter values to one model, always relative to the values it had when wrapped.

    ``apply`` is idempotent (absolute, not cumulative), so per-episode resampling never drifts.
    """

    def __init__(self, env: Any) -> None:
        u = getattr(env, "unwrapped", env)
        self.model = u.model
        self.dofs, self.acts = arm_indices(env)
        m = self.model
        self._nominal = {
            "kp": m.actuator_gainprm[self.acts, 0].copy(),
            "kv": m.actuator_biasprm[self.acts, 2].copy(),
            "damping": m.dof_damping[self.dofs].copy(),
            "armature": m.dof_armature[self.dofs].copy(),
            "frictionloss": m.dof_frictionloss[self.dofs].copy(),
        }
        self.current = nominal_params()

    def apply(self, params: Mapping[str, float]) -> dict[str, float]:
        """Set the model to ``params`` (missing kinds: nominal); returns the full set applied."""
        p = nominal_params()
        p.update(check_params(params))
        m, n = self.model, self._nominal
        m.actuator_gainprm[self.acts, 0] = n["kp"] * p["kp"]
        m.actuator_biasprm[self.acts, 1] = -n["kp"] * p["kp"]
        m.actuator_biasprm[self.acts, 2] = n["kv"] * p["damping"]
        m.dof_damping[self.dofs] = n["damping"] * p["damping"]
        m.dof_armature[self.dofs] = n["armature"] * p["armature"]
        m.dof_frictionloss[self.dofs] = n["frictionloss"] + p["frictionloss"]
        self.current = p
        return dict(p)


def sample_params(ranges: Mapping[str, tuple[float, float] | list[float]], rng: np.random.Generator,
                  base: Mapping[str, float] | None = None) -> dict[str, float]:
    """One draw: log-uniform within the range for scales, uniform for values; kinds without a
    range keep ``base`` (default nominal)."""
    out = nominal_params()
    out.update(base or {})
    for k, (lo, hi) in ranges.items():
        kind = PARAM_KINDS[k]
        if kind.mode == "scale" and lo > 0:
            out[k] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        else:
            out[k] = float(rng.uniform(lo, hi))
    return out


def to_fit(name: str, value: float) -> float:
    """Fit coordinate of a parameter: log for scales, log(1 + v) for values (smooth at 0, where the
    stock model's friction starts; a bound there stalls trust-region solvers)."""
    return float(np.log(value) if PARAM_KINDS[name].mode == "scale" else np.log1p(max(value, 0.0)))


def from_fit(name: str, z: float) -> float:
    """Inverse of :func:`to_fit`, clipped to the kind's bounds."""
    kind = PARAM_KINDS[name]
    v = np.exp(z) if kind.mode == "scale" else np.expm1(z)
    return float(np.clip(v, kind.lower, kind.upper))


def ranges_around(params: Mapping[str, float], sigma: Mapping[str, float], k: float = 3.0,
                  min_frac: float = 0.1) -> dict[str, list[float]]:
    """Randomization ranges for training: ``k`` standard errors either side of each fitted value
    and at least a factor ``1 + min_frac`` either way, in fit coordinates (:func:`to_fit`),
    clipped to the kind's bounds. ``sigma`` is the standard error in fit coordinates.
    """
    out: dict[str, list[float]] = {}
    for name, v in params.items():
        s = float(sigma.get(name, 0.0))
        half = max(k * (s if np.isfinite(s) else 0.0), float(np.log1p(min_frac)))
        z = to_fit(name, v)
        out[name] = [from_fit(name, z - half), from_fit(name, z + half)]
    return out
