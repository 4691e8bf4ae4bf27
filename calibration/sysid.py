"""System identification: fit the sim's physical parameters and control delay to logged robot data.

Each logged trajectory is replayed *open loop* in the MuJoCo model: start from the logged initial
state (``states`` = qpos|qvel when the file has them, else the arm's joint positions/velocities
from the first observation), execute the logged actions shifted by the candidate control delay
(the hold action fills the first steps, as the driver does), and compare the predicted
observations with the logged ``next_obs``. The actions are OGBench's relative end-effector
commands; the env turns each into joint targets with its own IK from the *simulated* state, which
is what the robot's controller does with its measured state.

The error is over the arm's proprioceptive dims (joint pos/vel, effector pos/yaw, gripper
opening: ``OBS_DIMS``), each divided by its spread in the log, so radians, rad/s and the scaled
effector position weigh alike. Cube poses are left out: contacts make them chaotic.

Fit: the delay by a scan over 0..``max_delay`` steps, then the continuous parameters by
``scipy.optimize.least_squares`` (log coordinates for scales; scales first, then all) with a
bounded number of evaluations; the delay is re-scanned at the fitted parameters. Standard errors come from the
Jacobian at the optimum (residuals are autocorrelated, so they are optimistic: the
randomization ranges use a floor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.randomization import (
    PARAM_KINDS,
    PhysicsParams,
    from_fit,
    nominal_params,
    ranges_around,
    to_fit,
)

log = logging.getLogger("qc_robot.calibration")
OBS_DIMS = slice(0, 18)
"""OGBench manipspace observation: joint pos (6), joint vel (6), effector pos (3, centred, x10),
effector yaw cos/sin (2), gripper opening (1, x3); then gripper contact and objects (excluded)."""
DEFAULT_KINDS = ("kp", "damping", "armature", "frictionloss")


@dataclass
class Trajectory:
    """One logged stretch of robot data."""

    actions: np.ndarray  # (N, A) commands sent, in [-1, 1]
    obs: np.ndarray  # (N, O) observation before each action
    next_obs: np.ndarray  # (N, O) observation after it
    states: np.ndarray | None = None  # (N, nq+nv) MuJoCo state at obs (sim logs only)
    name: str = ""


def load_trajectories(path: str, episodes: int = 3, steps: int = 50, obs_key: str = "state",
                      start: int = 0) -> list[Trajectory]:
    """The first ``episodes`` demos of an HDF5 file, each cut to ``steps`` steps from ``start``."""
    import h5py

    from qc_robot.data.hdf5_io import DatasetError, _demo_names

    out: list[Trajectory] = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise DatasetError(f"{path}: no group 'data'")
        for name in _demo_names(f["data"])[:episodes]:
            g = f["data"][name]
            sl = slice(start, start + steps)
            if f"obs/{obs_key}" not in g:
                raise DatasetError(f"{path}: data/{name}/obs/{obs_key} is missing")
            states = np.asarray(g["states"][sl], np.float64) if "states" in g else None
            out.append(Trajectory(np.asarray(g["actions"][sl], np.float64), np.asarray(g[f"obs/{obs_key}"][sl], np.float64),
                                  np.asarray(g[f"next_obs/{obs_key}"][sl], np.float64), states, name))
    if not out:
        raise DatasetError(f"{path}: no demos to identify from")
    return out


class Replayer:
    """One simulator instance that replays trajectories under given parameters (reused: building an
    OGBench env takes about a second)."""

    def __init__(self, env_name: str, seed: int = 0) -> None:
        from sim.tasks import make_env

        self.env = make_env(env_name, seed=seed)
        self.env.reset(seed=seed)
        self.unwrapped: Any = self.env.unwrapped
        self.physics = PhysicsParams(self.env)
        self.evals = 0

    def close(self) -> None:
        self.env.close()

    def _set_initial_state(self, traj: Trajectory) -> None:
        import mujoco

        u = self.unwrapped
        m, d = u.model, u.data
        self.env.reset(seed=0)
        if traj.states is not None:
            u.set_state(traj.states[0, : m.nq].copy(), traj.states[0, m.nq : m.nq + m.nv].copy())
            return
        # No simulator state on a real robot: the arm's joints from the observation; the rest stays
        # where reset put it (cubes matter only through contacts, which the error leaves out).
        dofs, _ = self.physics.dofs, self.physics.acts
        joints = [int(np.nonzero(m.jnt_dofadr == dof)[0][0]) for dof in dofs]
        d.qpos[m.jnt_qposadr[joints]] = traj.obs[0, 0:6]
        d.qvel[dofs] = traj.obs[0, 6:12]
        mujoco.mj_forward(m, d)

    def rollout(self, traj: Trajectory, params: dict[str, float], delay: int) -> np.ndarray:
        """Predicted next observations (N, O) of ``traj`` under ``params`` and ``delay`` steps."""
        self.physics.apply(params)
        self._set_initial_state(traj)
        n, a_dim = traj.actions.shape
        cmds = np.concatenate([np.zeros((delay, a_dim)), traj.actions])[:n]  # (N, A): hold, then shifted
        pred = np.empty((n, traj.next_obs.shape[1]))
        for t in range(n):
            pred[t] = self.unwrapped.step(cmds[t])[0]
        self.evals += 1
        return pred


def obs_scale(trajs: Sequence[Trajectory]) -> np.ndarray:
    """Per-dim spread of the logged observations used to weigh the error (floored)."""
    x = np.concatenate([t.next_obs[:, OBS_DIMS] for t in trajs])  # (T, D)
    s = x.std(axis=0)
    return np.maximum(s, max(1e-3, 0.05 * float(np.median(s))))


def residuals(rep: Replayer, trajs: Sequence[Trajectory], params: dict[str, float], delay: int,
              scale: np.ndarray) -> np.ndarray:
    """Stacked normalised prediction errors over every trajectory, step and dim."""
    r = [((rep.rollout(t, params, delay) - t.next_obs)[:, OBS_DIMS] / scale).ravel() for t in trajs]
    return np.concatenate(r)


def rms(r: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(r))))


@dataclass
class SysIdResult:
    params: dict[str, float]
    sigma: dict[str, float]
    """Standard errors in fit coordinates (log for scales, linear for values)."""
    delay_steps: int
    error_before: float
    """Normalised RMS replay error with the nominal model and no delay."""
    error_after: float
    ranges: dict[str, list[float]]
    evals: int
    seconds: float
    delay_scan: dict[int, float] = field(default_factory=dict)
    joint_pos_rmse: tuple[float, float] = (0.0, 0.0)
    """(before, after) RMSE of the arm's joint positions in rad."""
    effector_rmse_m: tuple[float, float] = (0.0, 0.0)
    """(before, after) RMSE of the effector position in m."""

    @property
    def reduction(self) -> float:
        return self.error_before / max(self.error_after, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "sigma": self.sigma, "control_delay_steps": self.delay_steps,
                "ranges": self.ranges, "error_before": self.error_before, "error_after": self.error_after,
                "joint_pos_rmse_rad": list(self.joint_pos_rmse), "effector_rmse_m": list(self.effector_rmse_m),
                "evals": self.evals, "seconds": self.seconds,
                "delay_scan": {str(k): v for k, v in self.delay_scan.items()}}


def _to_x(params: dict[str, float], kinds: Sequence[str]) -> np.ndarray:
    return np.array([to_fit(k, params[k]) for k in kinds])


def _from_x(x: np.ndarray, kinds: Sequence[str], base: dict[str, float]) -> dict[str, float]:
    p = dict(base)
    p.update({k: from_fit(k, float(v)) for k, v in zip(kinds, x, strict=True)})
    return p


def _scan_delay(rep: Replayer, trajs: Sequence[Trajectory], params: dict[str, float], max_delay: int,
                scale: np.ndarray) -> dict[int, float]:
    return {d: rms(residuals(rep, trajs, params, d, scale)) for d in range(max_delay + 1)}


def identify(env_name: str, trajs: Sequence[Trajectory], kinds: Sequence[str] = DEFAULT_KINDS,
             max_delay: int = 4, max_iters: int = 12, range_k: float = 3.0, range_min_frac: float = 0.1,
             replayer: Replayer | None = None) -> SysIdResult:
    """Fit ``kinds`` and the control delay to ``trajs`` (see the module docstring)."""
    from scipy.optimize import least_squares

    t0 = time.monotonic()
    for k in kinds:
        if k not in PARAM_KINDS:
            raise ValueError(f"unknown parameter kind {k!r}; known: {sorted(PARAM_KINDS)}")
    rep = replayer or Replayer(env_name)
    evals0 = rep.evals
    scale = obs_scale(trajs)
    base = nominal_params()
    r0 = residuals(rep, trajs, base, 0, scale)
    before = rms(r0)
    scan = _scan_delay(rep, trajs, base, max_delay, scale)
    delay = min(scan, key=scan.__getitem__)
    params = dict(base)
    sigma = dict.fromkeys(kinds, float("nan"))
    # Stage 1 fits the smooth scale kinds; stage 2 adds the value kinds (Coulomb friction makes the
    # landscape kinked: fitted from nominal at once it trades off against kp/damping and stalls).
    smooth = [k for k in kinds if PARAM_KINDS[k].mode == "scale"]
    stages = [s for s in (smooth, list(kinds)) if s]
    if len(stages) == 2 and stages[0] == stages[1]:
        stages = stages[:1]
    for round_ in range(2):  # fit at the delay, re-scan the delay at the fit; twice is enough here
        for stage in stages if round_ == 0 else stages[-1:]:
            def fun(z: np.ndarray, d: int = delay, stage: list[str] = stage, p0: dict = params) -> np.ndarray:
                return residuals(rep, trajs, _from_x(z, stage, p0), d, scale)

            # unbounded in fit coordinates (bounds are clipped in _from_x): bounds stall 'trf' near them
            sol = least_squares(fun, _to_x(params, stage), diff_step=0.02, max_nfev=max_iters, xtol=1e-3,
                                ftol=1e-4)
            params = _from_x(sol.x, stage, params)
            sigma.update(_standard_errors(sol.jac, sol.fun, stage))
        scan = _scan_delay(rep, trajs, params, max_delay, scale)
        new_delay = min(scan, key=scan.__getitem__)
        if new_delay == delay:
            break
        delay = new_delay
    r1 = residuals(rep, trajs, params, delay, scale)
    result = SysIdResult(params=params, sigma=sigma, delay_steps=delay, error_before=before, error_after=rms(r1),
                         ranges=ranges_around({k: params[k] for k in kinds}, sigma, range_k, range_min_frac),
                         evals=rep.evals - evals0, seconds=time.monotonic() - t0, delay_scan=scan)
    result.joint_pos_rmse = (_dim_rmse(r0, scale, trajs, slice(0, 6)), _dim_rmse(r1, scale, trajs, slice(0, 6)))
    eff = _dim_rmse(r0, scale, trajs, slice(12, 15)) / 10, _dim_rmse(r1, scale, trajs, slice(12, 15)) / 10
    result.effector_rmse_m = eff  # the observation scales the effector position by 10
    if replayer is None:
        rep.close()
    log.info("sysid: error %.4f -> %.4f (x%.1f), delay %d, params %s, %d evals in %.1f s", before,
             result.error_after, result.reduction, delay, params, result.evals, result.seconds)
    return result


def _dim_rmse(r: np.ndarray, scale: np.ndarray, trajs: Sequence[Trajectory], dims: slice) -> float:
    """RMSE in observation units of ``dims`` from the stacked normalised residuals."""
    d = len(scale)
    raw = r.reshape(-1, d) * scale  # (T, D) back to observation units
    return float(np.sqrt(np.mean(np.square(raw[:, dims]))))


def _standard_errors(jac: np.ndarray, res: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    m, n = jac.shape
    s2 = float(res @ res) / max(m - n, 1)
    try:
        cov = np.linalg.pinv(jac.T @ jac) * s2
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        se = np.full(n, np.nan)
    return {k: float(v) for k, v in zip(kinds, se, strict=True)}


def plot_fit(env_name: str, trajs: Sequence[Trajectory], result: SysIdResult, path: str,
             replayer: Replayer | None = None) -> str:
    """PNG: logged vs predicted (nominal / fitted) joint positions and effector height of the
    first trajectory, and the delay scan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = replayer or Replayer(env_name)
    t = trajs[0]
    before = rep.rollout(t, nominal_params(), 0)
    after = rep.rollout(t, result.params, result.delay_steps)
    if replayer is None:
        rep.close()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = np.arange(len(t.actions))
    for j, c in zip((0, 1, 3), ("C0", "C1", "C2"), strict=True):
        axes[0].plot(steps, t.next_obs[:, j], c, lw=2, label=f"log q{j}")
        axes[0].plot(steps, before[:, j], c, ls=":", label=f"nominal q{j}")
        axes[0].plot(steps, after[:, j], c, ls="--", label=f"fitted q{j}")
    axes[0].set(title="joint positions (rad)", xlabel="control step")
    axes[0].legend(fontsize=6, ncol=3)
    z = 14  # effector z (x10; OGBench centres x only)
    axes[1].plot(steps, t.next_obs[:, z] / 10, "k", lw=2, label="log")
    axes[1].plot(steps, before[:, z] / 10, "C3", ls=":", label="nominal")
    axes[1].plot(steps, after[:, z] / 10, "C2", ls="--", label="fitted")
    axes[1].set(title="effector height (m)", xlabel="control step")
    axes[1].legend(fontsize=7)
    ds = sorted(result.delay_scan)
    axes[2].bar([str(d) for d in ds], [result.delay_scan[d] for d in ds], color="C4")
    axes[2].set(title=f"replay error vs delay (fit: {result.delay_steps})", xlabel="delay (steps)",
                ylabel="normalised RMS")
    fig.suptitle(f"sysid {env_name}: error {result.error_before:.3f} -> {result.error_after:.3f} "
                 f"(x{result.reduction:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
