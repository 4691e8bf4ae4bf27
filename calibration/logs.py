"""Robot logs for calibration: read, check and describe an HDF5 episode file before any step uses it.

Every calibration step that reads a dataset goes through :func:`check_log` first, so a bad log is
one :class:`CalibrationError` naming the file and the field (``data/demo_3/next_obs/state[12, 4]
is NaN``), never a NaN that compares as "no drift", a fit pinned at its bounds or a numpy
broadcast message. The task is checked from the file's ``env_args``: its ``task`` when it names
one, else the observation and action widths and the control rate against the task's.

Realtime logs are the robot's own record of each executed control step (``Driver.executed_steps``:
one row per tick, ``actions`` the command that tick applied, the hold command on a held tick), so
a replay one row per step reproduces what the robot experienced. ``qc-robot calibrate step=excite``
on such a driver adds, per row:

* ``held`` (N,): 1 where no new command had arrived and the controller held.
* ``t_tick`` (N,): when the tick applied its command, robot seconds since the episode's reset.
* ``t_sent`` (N,): when that command was sent (-1 on held rows), same clock: the actuation
  latency is bounded by ``t_tick - t_sent`` and the previous tick's time.
* ``ctrl`` (N, U), optional: the actuator targets the tick applied, in the order of the sim
  model's actuators (the IK's joint targets and the gripper's command on the sim; on a real arm
  its controller's commanded joint positions). With it the replay drives the servos with the
  robot's own targets instead of recomputing them through the IK (``replay=ctrl``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from qc_robot.calibration.files import CalibrationError

TIMING_KEYS = ("held", "t_tick", "t_sent")
"""Fields of a realtime excitation log (all or none)."""


@dataclass
class Trajectory:
    """One logged stretch of robot data."""

    actions: np.ndarray  # (N, A) commands sent, in [-1, 1]
    obs: np.ndarray  # (N, O) observation before each action
    next_obs: np.ndarray  # (N, O) observation after it
    states: np.ndarray | None = None  # (N, nq+nv) MuJoCo state at obs (sim logs only)
    name: str = ""
    held: np.ndarray | None = None  # (N,) realtime: 1 where the tick held (no new command)
    t_tick: np.ndarray | None = None  # (N,) realtime: when each row's tick applied its command (robot s)
    t_sent: np.ndarray | None = None  # (N,) realtime: when that command was sent (-1: held)
    ctrl: np.ndarray | None = None  # (N, U) realtime: the actuator targets each tick applied

    @property
    def realtime(self) -> bool:
        """Rows are the robot's executed steps with their timing (see the module docstring)."""
        return self.t_tick is not None


def _where(path: str, name: str, key: str, bad: np.ndarray) -> str:
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{path}: data/{name}/{key}{list(idx)} is NaN or infinite"


def _env_args(path: str, f: Any) -> dict[str, Any]:
    raw = f["data"].attrs.get("env_args", "{}")
    try:
        args = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except json.JSONDecodeError:
        raise CalibrationError(f"{path}: data.attrs['env_args'] is not valid JSON") from None
    if not isinstance(args, dict):
        raise CalibrationError(f"{path}: data.attrs['env_args'] must be a JSON object")
    return args


def check_task(path: str, env_args: dict[str, Any], task: str, obs_dim: int | None = None,
               act_dim: int | None = None) -> None:
    """Refuse a log recorded on another task: its ``env_args['task']``, else its widths and rate."""
    from qc_robot.sim.tasks import task_spec  # static table

    spec = task_spec(task)
    logged = env_args.get("task") or env_args.get("env")
    if logged and str(logged) != task:
        raise CalibrationError(f"{path}: env_args['task'] is {logged!r}, this calibration is for {task!r}")
    if obs_dim is not None and obs_dim != spec.obs_dim:
        raise CalibrationError(f"{path}: obs width {obs_dim} is not {task}'s {spec.obs_dim} (a log of another task?)")
    if act_dim is not None and act_dim != spec.act_dim:
        raise CalibrationError(f"{path}: actions width {act_dim} is not {task}'s {spec.act_dim}")
    hz = env_args.get("control_hz")
    if hz is not None and (not isinstance(hz, (int, float)) or isinstance(hz, bool)):
        raise CalibrationError(f"{path}: env_args['control_hz'] must be a number, got {hz!r}")
    if isinstance(hz, (int, float)) and not isinstance(hz, bool) and abs(float(hz) - spec.control_hz) > 1e-6:
        raise CalibrationError(f"{path}: env_args['control_hz'] is {hz}, {task} runs at {spec.control_hz}")


def check_log(path: str, task: str, obs_key: str = "state", episodes: int | None = None) -> dict[str, Any]:
    """Check the first ``episodes`` demos (None: all) of ``path`` for ``task``; returns its env_args.

    Raises CalibrationError (one line, naming file and field) on: a missing file or group, a log
    of another task, a missing field, rows of different lengths, NaN/inf in any array a step
    reads, or inconsistent realtime timing fields.
    """
    import h5py

    from qc_robot.data.hdf5_io import _demo_names

    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise CalibrationError(f"{path}: dataset not found") from None
    except OSError as e:
        raise CalibrationError(f"{path}: not an HDF5 file ({e})") from None
    with f:
        if not isinstance(f.get("data"), h5py.Group):
            raise CalibrationError(f"{path}: no group 'data' (not a robot log of ours)")
        args = _env_args(path, f)
        names = _demo_names(f["data"])
        if not names:
            raise CalibrationError(f"{path}: no demos in group 'data'")
        check_task(path, args, task)
        for name in names[: episodes if episodes is not None else len(names)]:
            g = f["data"][name]
            n = None
            for key in ("actions", f"obs/{obs_key}", f"next_obs/{obs_key}", "states", *TIMING_KEYS, "ctrl"):
                if key not in g:
                    if key in ("actions", f"obs/{obs_key}", f"next_obs/{obs_key}"):
                        raise CalibrationError(f"{path}: data/{name}/{key} is missing")
                    continue
                try:
                    v = np.asarray(g[key][()], np.float64)
                except (TypeError, ValueError):
                    raise CalibrationError(f"{path}: data/{name}/{key} is not numeric") from None
                want = 1 if key in TIMING_KEYS else 2  # (N,) per-row fields; (N, D) the others
                if v.ndim != want:
                    shape = "(rows,)" if want == 1 else "(rows, width)"
                    raise CalibrationError(f"{path}: data/{name}/{key} has shape {v.shape}, expected {shape}")
                if n is None:
                    n = len(v)
                if len(v) != n:
                    raise CalibrationError(f"{path}: data/{name}/{key} has {v.shape} rows, actions has {n}")
                bad = ~np.isfinite(v)
                if bad.any():
                    raise CalibrationError(_where(path, name, key, bad))
                if key == "held" and not np.isin(v, (0.0, 1.0)).all():
                    i = int(np.flatnonzero(~np.isin(v, (0.0, 1.0)))[0])
                    raise CalibrationError(f"{path}: data/{name}/held[{i}] is {v[i]:g}, must be 0 or 1")
            o, o2 = g[f"obs/{obs_key}"].shape, g[f"next_obs/{obs_key}"].shape
            if o[-1] != o2[-1]:
                raise CalibrationError(f"{path}: data/{name}/next_obs/{obs_key} width {o2[-1]} differs from "
                                       f"obs/{obs_key}'s {o[-1]}")
            check_task(path, args, task, obs_dim=int(g[f"obs/{obs_key}"].shape[-1]),
                       act_dim=int(g["actions"].shape[-1]))
            present = [k for k in TIMING_KEYS if k in g]
            if present and len(present) != len(TIMING_KEYS):
                missing = sorted(set(TIMING_KEYS) - set(present))
                raise CalibrationError(f"{path}: data/{name} has realtime fields {present} but not {missing}")
            if present:
                t_tick, t_sent = np.asarray(g["t_tick"][()]), np.asarray(g["t_sent"][()])
                applied = t_sent >= 0
                if (np.diff(t_tick) < 0).any() or (t_sent[applied] > t_tick[applied] + 1e-9).any():
                    raise CalibrationError(f"{path}: data/{name}/t_tick must increase and follow t_sent (clocks?)")
                held = np.asarray(g["held"][()]) > 0
                if applied[held].any():
                    i = int(np.flatnonzero(held & applied)[0])
                    raise CalibrationError(f"{path}: data/{name}/t_sent[{i}] is {t_sent[i]:g} on a held row "
                                           f"(held rows applied no new command: t_sent must be -1)")
    return args


def load_trajectories(path: str, task: str, episodes: int = 3, steps: int = 0, obs_key: str = "state",
                      start: int = 0) -> list[Trajectory]:
    """The first ``episodes`` demos of a checked log (see :func:`check_log`), each cut to ``steps``
    rows from ``start`` (0: all rows)."""
    import h5py

    from qc_robot.data.hdf5_io import _demo_names

    check_log(path, task, obs_key, episodes)
    out: list[Trajectory] = []
    with h5py.File(path, "r") as f:
        for name in _demo_names(f["data"])[:episodes]:
            g = f["data"][name]
            sl = slice(start, start + steps if steps > 0 else None)

            def get(key: str, dtype: Any = np.float64, g: Any = g, sl: slice = sl) -> np.ndarray | None:
                return np.asarray(g[key][sl], dtype) if key in g else None

            t = Trajectory(np.asarray(g["actions"][sl], np.float64), np.asarray(g[f"obs/{obs_key}"][sl], np.float64),
                           np.asarray(g[f"next_obs/{obs_key}"][sl], np.float64), get("states"), name,
                           get("held"), get("t_tick"), get("t_sent"), get("ctrl"))
            if len(t.actions) == 0:
                raise CalibrationError(f"{path}: data/{name} has no rows from {start}")
            out.append(t)
    nx, nu = model_widths(task)
    for t in out:
        for key, arr, width, what in (("states", t.states, nx, "qpos and qvel"), ("ctrl", t.ctrl, nu, "actuators")):
            if arr is not None and arr.shape[1] != width:
                raise CalibrationError(f"{path}: data/{t.name}/{key} has width {arr.shape[1]}, {task}'s model has "
                                       f"{width} ({what})")
    return out


@functools.lru_cache(maxsize=8)
def model_widths(task: str) -> tuple[int, int]:
    """(nq + nv, nu) of ``task``'s MuJoCo model: the widths of a log's ``states`` and ``ctrl``."""
    from qc_robot.sim.tasks import make_env

    env = make_env(task, seed=0)
    try:
        m: Any = getattr(env.unwrapped, "model")  # noqa: B009 (MujocoEnv; gymnasium types it as Env)
        return int(m.nq + m.nv), int(m.nu)
    finally:
        env.close()
