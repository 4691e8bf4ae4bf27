"""Open-loop replay of a robot log in the MuJoCo model under candidate physics and delay.

A log is replayed one control step per row. What a row's command means depends on the log:

* **Executed steps** (a realtime driver's own record, ``qc_robot.calibration.logs``): row ``t``'s action is
  the command the robot's controller applied at that tick (the hold command on a held tick), so
  the replay runs them as they are: the robot's latency, its held ticks and its late reads are
  already in the rows, and at the robot's true physics the replay reproduces the log.
* **Applied targets** (executed steps with a ``ctrl`` field): each row sets the actuator targets
  the robot's controller applied at that tick and steps the physics, bypassing the env's IK. The
  IK is iterative and stops at an error threshold, so its joint targets jump when a parameter
  change moves the state across a stopping point; replayed through it, the error of one row
  jumps with a 1 % change of kp. The logged targets make the replay smooth in the parameters.
* **Loop rows** (a lockstep driver, or a realtime one that keeps no record): row ``t``'s action is
  the command the control loop sent; the replay executes the command of row ``t - delay`` (the
  hold command before the first), which is what the lockstep sim driver does with a
  ``delay``-step FIFO. For a realtime robot this is an approximation (it has no held ticks).

Each prediction starts from the logged initial state (``states`` when the file has them, else the
arm's joints from the first observation) and each command goes through the env's own IK from the
*simulated* state, as the robot's controller does with its measured state.

``segment=K`` restarts the prediction every ``K`` rows from the logged state at that row
(*multiple shooting*): an open-loop replay of a whole episode lets a small parameter error grow
through the arm's motion and its contacts with the table, so its error surface has many shallow
basins; short segments keep each prediction near the log, and their error is smooth in the
parameters (the global stage of ``qc_robot.calibration.sysid`` searches it). A restart mid-log
cannot be exact: the env reads the effector pose for the next relative command from the
kinematics of the last physics substep, which we emulate from the logged joint velocities, and a
log without ``states`` restarts only the arm's joints (the gripper and cubes keep their simulated
state).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qc_robot.calibration.logs import Trajectory
from qc_robot.calibration.randomization import PhysicsParams

MODES = ("auto", "lockstep", "executed", "ctrl")
OBS_XYZ_CENTER = np.array([0.425, 0.0, 0.0])
OBS_XYZ_SCALE = 10.0
"""OGBench manipspace observations hold positions as ``(p - center) * 10``."""
OBS_ARM_DIMS = 19
"""Arm and gripper dims before the first cube's (pos 3, quat 4, yaw cos/sin 2) in the observation."""
OBS_CUBE_DIMS = 9
CONTACT_MOVE_M = 5e-4
"""A row where a cube's logged position moves more than this (m) ..."""
CONTACT_TURN = 5e-3
"""... or a quaternion component changes more than this, is a contact row (the arm pushes it)."""


def contact_rows(traj: Trajectory, move_m: float = CONTACT_MOVE_M, turn: float = CONTACT_TURN,
                 before: int = 1, after: int = 3) -> np.ndarray:
    """(N,) True where the arm is in contact with a cube in a log without simulator states: a cube
    moved between the row's observation and the next, or the gripper reports contact (obs dim 18),
    widened by ``before`` rows before and ``after`` rows after (a push starts with sub-threshold
    motion; after it the gripper's fingers, whose joints the observation does not hold, still ring
    for a few rows: 2.6e-3 of error on the row after a push, 3e-4 three rows later, on the sim).

    Without ``states`` the replay knows each cube's pose but not its velocity or the contact forces,
    and a one-step prediction across a push is off even at the true physics; those rows leave the
    error (fit and check alike). On the sim, 0.5 mm catches a push from its first row; a real arm
    whose cube tracker is noisier needs a larger ``move_m``."""
    n, dim = traj.obs.shape
    hit = np.zeros(n, bool)
    for i in range((dim - OBS_ARM_DIMS) // OBS_CUBE_DIMS if dim > OBS_ARM_DIMS else 0):
        o = OBS_ARM_DIMS + OBS_CUBE_DIMS * i
        moved = np.linalg.norm(traj.next_obs[:, o : o + 3] - traj.obs[:, o : o + 3], axis=1) / OBS_XYZ_SCALE
        turned = np.max(np.abs(traj.next_obs[:, o + 3 : o + 7] - traj.obs[:, o + 3 : o + 7]), axis=1)
        hit |= (moved > move_m) | (turned > turn)
    if dim > OBS_ARM_DIMS - 1:
        hit |= (traj.obs[:, OBS_ARM_DIMS - 1] > 0.5) | (traj.next_obs[:, OBS_ARM_DIMS - 1] > 0.5)
    out = hit.copy()
    for k in range(1, after + 1):
        out[k:] |= hit[:-k]
    for k in range(1, before + 1):
        out[:-k] |= hit[k:]
    return out


def replay_mode(trajs: list[Trajectory], mode: str = "auto") -> str:
    """``ctrl`` for logs of executed steps with their applied targets, ``executed`` for logs of
    executed steps without, else ``lockstep``; ``auto`` picks by the log, an explicit mode the log
    cannot support is an error, ``lockstep`` is always possible (it treats an executed-steps log
    as loop rows: what the old replayer did)."""
    if mode not in MODES:
        raise ValueError(f"replay must be one of {MODES}, got {mode!r}")
    executed = bool(trajs) and all(t.realtime for t in trajs)
    if mode in ("executed", "ctrl") and not executed:
        raise ValueError(f"replay={mode} needs a realtime log of executed steps (held, t_tick, t_sent)")
    has_ctrl = executed and all(t.ctrl is not None for t in trajs)
    if mode == "ctrl" and not has_ctrl:
        raise ValueError("replay=ctrl needs the applied actuator targets (a 'ctrl' field in every episode)")
    if mode == "auto":
        return "ctrl" if has_ctrl else "executed" if executed else "lockstep"
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

    def _set_initial_state(self, traj: Trajectory, row: int = 0) -> None:
        """The logged state at ``row`` (0: a fresh reset first; later rows: the restart of a segment)."""
        import mujoco

        u = self.unwrapped
        m, d = u.model, u.data
        if row == 0:
            self.env.reset(seed=0)
        if traj.states is not None:
            d.qpos[:] = traj.states[row, : m.nq]
            d.qvel[:] = traj.states[row, m.nq : m.nq + m.nv]
        else:
            # No simulator state on a real robot: the arm's joints from the observation, and each cube's
            # pose from it (at rest: the observation has no cube velocity; rows where a cube moves are
            # out of the error, `contact_rows`). The gripper's joints stay where reset (or the
            # simulation so far) put them.
            dofs = self.physics.dofs
            d.qpos[self._arm_qpos] = traj.obs[row, 0:6]
            d.qvel[dofs] = traj.obs[row, 6:12]
            for qpos, dof, o in self._objects(traj.obs.shape[1]):
                d.qpos[qpos : qpos + 3] = traj.obs[row, o : o + 3] / OBS_XYZ_SCALE + OBS_XYZ_CENTER
                quat = traj.obs[row, o + 3 : o + 7]
                d.qpos[qpos + 3 : qpos + 7] = quat / max(float(np.linalg.norm(quat)), 1e-9)
                d.qvel[dof : dof + 6] = 0.0
        mujoco.mj_forward(m, d)
        if row > 0:
            self._stale_kinematics()

    def _stale_kinematics(self) -> None:
        """Leave the kinematics one physics substep behind the state, as they are after ``mj_step``
        (it integrates after computing them): the env takes the effector pose of the next relative
        command from them, so a restart with fresh kinematics would command another target."""
        import mujoco

        u = self.unwrapped
        m, d = u.model, u.data
        qpos, qvel = d.qpos.copy(), d.qvel.copy()
        mujoco.mj_integratePos(m, d.qpos, qvel, -m.opt.timestep)
        mujoco.mj_kinematics(m, d)
        d.qpos[:] = qpos

    def _objects(self, obs_dim: int) -> list[tuple[int, int, int]]:
        """(qpos address, dof address, first obs dim) of each cube whose pose the observation holds
        (OGBench cube tasks: 9 dims per cube after the 19 of the arm and gripper)."""
        u, m = self.unwrapped, self.unwrapped.model
        out = []
        for i in range(int(getattr(u, "_num_cubes", 0))):
            o = OBS_ARM_DIMS + OBS_CUBE_DIMS * i
            if o + OBS_CUBE_DIMS > obs_dim:
                break
            j = m.joint(f"object_joint_{i}")
            out.append((int(j.qposadr[0]), int(j.dofadr[0]), o))
        return out

    @property
    def _arm_qpos(self) -> np.ndarray:
        m = self.unwrapped.model
        joints = [int(np.nonzero(m.jnt_dofadr == dof)[0][0]) for dof in self.physics.dofs]
        return np.asarray(m.jnt_qposadr[joints])

    def rollout(self, traj: Trajectory, params: dict[str, float], delay: int = 0, segment: int = 0,
                ctrl: bool = False) -> np.ndarray:
        """Predicted next observations (N, O) of ``traj`` under ``params``, row ``t`` executing the
        command of row ``t - delay`` (0 for executed-steps logs); ``segment > 0`` restarts from the
        logged state every ``segment`` rows; ``ctrl``: drive the logged actuator targets instead of
        the commands (see the module docstring)."""
        self.physics.apply(params)
        n, a_dim = traj.actions.shape
        pred = np.empty((n, traj.next_obs.shape[1]))
        cmds = np.concatenate([np.tile(self.hold, (delay, 1)), traj.actions])[:n]  # (N, A): hold, then shifted

        def command_step(t: int) -> np.ndarray:
            return np.asarray(self.unwrapped.step(cmds[t])[0])

        step = self._ctrl_step(traj) if ctrl else command_step
        for t in range(n):
            if t == 0 or (segment > 0 and t % segment == 0):
                self._set_initial_state(traj, t)
            pred[t] = step(t)
        self.evals += 1
        return pred

    def _ctrl_step(self, traj: Trajectory) -> Any:
        """One control step of the env with row ``t``'s logged actuator targets: the env's own step
        (substeps, post-step hooks, observation) less its IK."""
        import mujoco

        u = self.unwrapped
        m, d = u.model, u.data
        targets = traj.ctrl
        if targets is None or targets.ndim != 2 or targets.shape[1] != m.nu:
            shape = None if targets is None else targets.shape
            raise ValueError(f"{traj.name or 'trajectory'}: ctrl must be (rows, {m.nu}) actuator targets, got {shape}")

        def step(t: int) -> np.ndarray:
            d.ctrl[:] = targets[t]
            u.pre_step()
            mujoco.mj_step(m, d, nstep=u._n_steps)
            mujoco.mj_rnePostConstraint(m, d)
            u.post_step()
            return np.asarray(u.compute_observation())

        return step
