"""Open-loop replay of a robot log in the MuJoCo model under candidate physics and delay.

A log is replayed one control step per row. What a row's command means depends on the log:

* **Executed steps** (a realtime driver's own record, ``qc_robot.calibration.logs``): row ``t``'s action is
  the command the robot's controller applied at that tick (the hold command on a held tick), so
  the replay runs them as they are: the robot's latency, its held ticks and its late reads are
  already in the rows, and at the robot's true physics the replay reproduces the log.
* **Loop rows** (a lockstep driver, or a realtime one that keeps no record): row ``t``'s action is
  the command the control loop sent; the replay executes the command of row ``t - delay`` (the
  hold command before the first), which is what the lockstep sim driver does with a
  ``delay``-step FIFO. For a realtime robot this is an approximation (it has no held ticks).

Each prediction starts from the logged initial state (``states`` when the file has them, else the
arm's joints from the first observation) and each command goes through the env's own IK from the
*simulated* state, as the robot's controller does with its measured state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qc_robot.calibration.logs import Trajectory
from qc_robot.calibration.randomization import PhysicsParams

MODES = ("auto", "lockstep", "executed")


def replay_mode(trajs: list[Trajectory], mode: str = "auto") -> str:
    """``executed`` for logs of executed steps, else ``lockstep``; ``auto`` picks by the log, an
    explicit ``executed`` on a log without the timing fields is an error, ``lockstep`` is always
    possible (it treats an executed-steps log as loop rows: what the old replayer did)."""
    if mode not in MODES:
        raise ValueError(f"replay must be one of {MODES}, got {mode!r}")
    executed = bool(trajs) and all(t.realtime for t in trajs)
    if mode == "executed" and not executed:
        raise ValueError("replay=executed needs a realtime log of executed steps (held, t_tick, t_sent)")
    if mode == "auto":
        return "executed" if executed else "lockstep"
    return mode


class Replayer:
    """One simulator instance that replays trajectories under given parameters (reused: building an
    OGBench env takes about a second)."""

    def __init__(self, env_name: str, seed: int = 0) -> None:
        from qc_robot.sim.tasks import make_env

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

    def rollout(self, traj: Trajectory, params: dict[str, float], delay: int = 0) -> np.ndarray:
        """Predicted next observations (N, O) of ``traj`` under ``params``, row ``t`` executing the
        command of row ``t - delay`` (0 for executed-steps logs)."""
        self.physics.apply(params)
        self._set_initial_state(traj)
        n, a_dim = traj.actions.shape
        cmds = np.concatenate([np.tile(self.hold, (delay, 1)), traj.actions])[:n]  # (N, A): hold, then shifted
        pred = np.empty((n, traj.next_obs.shape[1]))
        step = self.unwrapped.step
        for t in range(n):
            pred[t] = step(cmds[t])[0]
        self.evals += 1
        return pred
