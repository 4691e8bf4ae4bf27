"""Open-loop replay of a robot log in the MuJoCo model under candidate physics and delay.

Two ways a log is replayed, chosen from what it carries (``calibration.logs``):

* **Lockstep rows** (a lockstep driver, or a log without timing fields): one control step per row;
  row ``t`` executes the command of row ``t - delay`` (the hold command before the first), which
  is what the lockstep sim driver does with a ``delay``-step FIFO.
* **Realtime ticks** (a realtime log): the robot's controller ran its own ticks; between two
  observations 0, 1 or 2 of them ran, each applying the newest command that had *arrived* since
  the previous tick, or holding when none had. The replay runs exactly those ticks. Which command
  each tick applied is taken from the log's ``tick_src`` when the driver reported it
  (``mode="ticks"``), or reconstructed from the send times ``t_act`` plus an actuation latency
  (``mode="timestamps"``, the latency a fit parameter): a command sent at ``s`` arrives at
  ``s + latency`` and is applied at the first tick at or after that.

Each prediction starts from the logged initial state (``states`` when the file has them, else the
arm's joints from the first observation) and each command goes through the env's own IK from the
*simulated* state, as the robot's controller does with its measured state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibration.logs import Trajectory
from calibration.randomization import PhysicsParams

MODES = ("auto", "lockstep", "ticks", "timestamps")


def replay_mode(trajs: list[Trajectory], mode: str = "auto") -> str:
    """The mode ``trajs`` are replayed in: ``auto`` picks ticks > timestamps > lockstep by what the
    log carries; an explicit mode the log cannot support is an error."""
    if mode not in MODES:
        raise ValueError(f"replay must be one of {MODES}, got {mode!r}")
    has_ticks = all(t.realtime for t in trajs)
    has_src = has_ticks and all(t.tick_src is not None for t in trajs)
    if mode == "auto":
        return "ticks" if has_src else "timestamps" if has_ticks else "lockstep"
    if mode == "ticks" and not has_src:
        raise ValueError("replay=ticks needs a log with tick_src (which command each tick applied)")
    if mode == "timestamps" and not has_ticks:
        raise ValueError("replay=timestamps needs a realtime log with t_act, tick_count and tick_time")
    return mode


def schedule(traj: Trajectory, latency_s: float | None) -> np.ndarray:
    """Row whose command each tick applied (K,), -1 = hold: the logged ``tick_src`` when
    ``latency_s`` is None, else reconstructed from the send times and ``latency_s``."""
    times, _, src, _ = traj.ticks()
    if latency_s is None:
        if src is None:
            raise ValueError(f"{traj.name}: no tick_src in the log")
        return src
    assert traj.t_act is not None
    arrival = traj.t_act + latency_s  # (N,) sorted: commands are sent in order
    newest = np.searchsorted(arrival, times, side="right") - 1  # (K,) newest arrived by each tick
    prev = np.concatenate([[-1], newest[:-1]])
    return np.where(newest > prev, newest, -1)  # a tick applies a command only if one arrived since the last


def latency_classes(traj_list: list[Trajectory], latencies: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
    """Group candidate latencies by the tick schedules they imply: [(latencies, schedules), ...]
    (the replay error is constant on each group, so one replay per group suffices)."""
    groups: dict[bytes, tuple[list[float], tuple]] = {}
    for lat in latencies:
        sched = tuple(schedule(t, float(lat)) for t in traj_list)
        key = b"|".join(s.tobytes() for s in sched)
        groups.setdefault(key, ([], sched))[0].append(float(lat))
    return [(np.asarray(v[0]), v[1]) for v in groups.values()]


class Replayer:
    """One simulator instance that replays trajectories under given parameters (reused: building an
    OGBench env takes about a second)."""

    def __init__(self, env_name: str, seed: int = 0) -> None:
        from sim.tasks import make_env

        self.env = make_env(env_name, seed=seed)
        self.env.reset(seed=seed)
        self.unwrapped: Any = self.env.unwrapped
        self.physics = PhysicsParams(self.env)
        self.hold = np.zeros(int(np.prod(self.env.action_space.shape or (0,))))
        """The drivers' hold command (zero relative motion)."""
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
        dofs = self.physics.dofs
        joints = [int(np.nonzero(m.jnt_dofadr == dof)[0][0]) for dof in dofs]
        d.qpos[m.jnt_qposadr[joints]] = traj.obs[0, 0:6]
        d.qvel[dofs] = traj.obs[0, 6:12]
        mujoco.mj_forward(m, d)

    def _set_arm(self, obs_row: np.ndarray) -> None:
        """Overwrite the arm's joints with a logged observation's (teacher forcing)."""
        import mujoco

        m, d = self.unwrapped.model, self.unwrapped.data
        d.qpos[self._arm_qpos] = obs_row[0:6]
        d.qvel[self.physics.dofs] = obs_row[6:12]
        mujoco.mj_forward(m, d)

    @property
    def _arm_qpos(self) -> np.ndarray:
        m = self.unwrapped.model
        return np.asarray([m.jnt_qposadr[int(np.nonzero(m.jnt_dofadr == dof)[0][0])] for dof in self.physics.dofs])

    def rollout(self, traj: Trajectory, params: dict[str, float], delay: int = 0,
                ticks: np.ndarray | None = None, teacher: bool = False) -> np.ndarray:
        """Predicted next observations (N, O) of ``traj`` under ``params``: lockstep rows with
        ``delay`` steps, or, given ``ticks`` (the :func:`schedule` of a realtime log), tick by tick.

        ``teacher``: one-step-ahead predictions instead of open loop (the arm is reset to each
        logged observation before its row's commands): a smoother error landscape, without the
        local minima that long open-loop horizons create, for the global stage of a fit."""
        self.physics.apply(params)
        self._set_initial_state(traj)
        n, a_dim = traj.actions.shape
        step = self.unwrapped.step
        pred = np.empty((n, traj.next_obs.shape[1]))
        if ticks is None:
            cmds = np.concatenate([np.zeros((delay, a_dim)), traj.actions])[:n]  # (N, A): hold, then shifted
            for t in range(n):
                if teacher and t > 0:
                    self._set_arm(traj.obs[t])
                pred[t] = step(cmds[t])[0]
        else:
            _, rows, _, done = traj.ticks()
            start = np.concatenate([[0], done[:-1]])  # (N,) first tick of each row
            for i in range(n):
                if teacher and i > 0:
                    self._set_arm(traj.obs[i])
                pred[i] = traj.obs[i] if teacher else (pred[i - 1] if i else traj.obs[0])  # no tick: no change
                for k in range(int(start[i]), int(done[i])):
                    src = ticks[k]
                    pred[i] = step(traj.actions[src] if src >= 0 else self.hold)[0]
        self.evals += 1
        return pred
