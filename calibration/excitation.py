"""Excitation logs for system identification: drive a robot with smooth random commands, log HDF5.

The signal is a first-order low-pass of Gaussian noise (``a_t = ρ a_{t-1} + (1-ρ) ε_t``, clipped),
rich enough to excite the servo's stiffness and damping but smooth enough to stay inside the
workspace and safe on hardware. Any driver works (through the safety layer on a real robot);
drivers with a ``sim_state()`` (the sim) also log MuJoCo ``states`` for exact replays, and drivers
that report the actuator targets each executed step applied (``ExecutedStep.extra['ctrl']``) log
them as ``ctrl``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def excitation_actions(steps: int, action_dim: int, rng: np.random.Generator, amplitude: float = 0.6,
                       smoothing: float = 0.6, gripper_dim: int | None = 4, gripper: str = "open") -> np.ndarray:
    """(steps, action_dim) smooth random commands in [-1, 1]. ``gripper_dim`` (OGBench: 4) is held
    open (``gripper="open"``, the default) or gets a slow open/close square wave (``"square"``).

    Open by default: sysid leaves the gripper alone, and a closed gripper presses its pads together,
    whose stick-slip contact turns the wrist's replay error into a step function of the arm's
    parameters (issue 16: every parameter off the truth replayed about as badly as any other, so no
    search could find it)."""
    if gripper not in ("open", "square"):
        raise ValueError(f"gripper must be 'open' or 'square', got {gripper!r}")
    a = np.zeros((steps, action_dim))
    prev = np.zeros(action_dim)
    # the low-pass shrinks the std by sqrt((1-ρ)/(1+ρ)): scale the noise up so the output has `amplitude`
    gain = amplitude * np.sqrt((1 + smoothing) / (1 - smoothing))
    for t in range(steps):
        prev = smoothing * prev + (1 - smoothing) * rng.normal(0.0, gain, action_dim)
        a[t] = prev
    if gripper_dim is not None and gripper_dim < action_dim:
        # the gripper command is relative: a steady -0.5 keeps the target at fully open
        a[:, gripper_dim] = -0.5 if gripper == "open" else np.where((np.arange(steps) // 15) % 2 == 0, -0.5, 0.5)
    return np.clip(a, -1.0, 1.0)


XYZ_CENTER = np.array([0.425, 0.0, 0.0])
"""OGBench manipspace observations centre positions on this point and scale them x10."""


def push_policy(rng: np.random.Generator, side: float = 0.07, height: float = 0.025) -> Any:
    """A closed-loop excitation that touches the cube (OGBench cube tasks): over to ``side`` m beside
    the first cube, down to ``height``, a sweep through it, then up. For testing what a calibration
    does with contact (``check`` on a log where the arm pushes the cube). Each phase ends when the
    effector is within 1.5 cm of its waypoint; the command is proportional to the effector's error
    plus a little noise (the rows must stay distinct)."""
    phase = [0]
    start = np.zeros(3)

    def act(obs: np.ndarray, t: int) -> np.ndarray:
        eff, cube = obs[12:15] / 10 + XYZ_CENTER, obs[19:22] / 10 + XYZ_CENTER
        if t == 0:
            phase[0], start[:] = 0, cube
        c = start
        waypoints = (c + [side, 0.0, 0.06], c + [side, 0.0, height - 0.02], c + [-side, 0.0, height - 0.02],
                     c + [-side, 0.0, 0.15])
        target = waypoints[phase[0]]
        if np.linalg.norm(target - eff) < 0.015 and phase[0] < len(waypoints) - 1:
            phase[0] += 1
            target = waypoints[phase[0]]
        a = np.zeros(5)
        # below saturation: clipped commands would repeat, and a log matches ticks to commands by value
        a[:3] = 0.9 * np.clip((target - eff) / 0.02, -1.0, 1.0) + rng.normal(0.0, 0.02, 3)
        a[4] = -0.5  # gripper open (see excitation_actions)
        return np.clip(a, -1.0, 1.0)

    return act


def record_excitation(driver: Any, path: str, episodes: int = 3, steps: int = 50, seed: int = 0,
                      env_args: dict[str, Any] | None = None, time_scale: float = 1.0,
                      policy: Any = None) -> str:
    """Run ``episodes`` excitation episodes on ``driver`` (connected or not) and write them to ``path``.

    Realtime drivers are paced at their control rate (× ``time_scale``). A realtime driver that
    logs its executed steps (``driver.logs_steps``) gives one row per executed step, the command
    it applied and its timing (``qc_robot.calibration.logs``): what sysid replays exactly. Commands are then
    sent at a random phase between the robot's ticks, so the log bounds the actuation latency
    tightly. Other drivers give one row per command sent, the observation read one period later.
    ``policy(obs, t) -> action``, when given, replaces the random commands (e.g. :func:`push_policy`
    for a log with contact); it reads the driver's latest observation before each command.
    """
    from qc_robot.data.hdf5_io import EpisodeWriter

    driver.connect()
    spec = driver.spec
    key = spec.obs_fields[0].key
    has_state = callable(getattr(driver, "sim_state", None))
    executed = bool(driver.realtime) and bool(getattr(driver, "logs_steps", False))
    period = 1.0 / (spec.control_hz * time_scale)
    args = {"source": "qc-robot calibrate excite", "driver": driver.name, "control_hz": spec.control_hz,
            "calibration_id": getattr(driver, "calibration_id", ""), "realtime": bool(driver.realtime),
            "rows": "executed steps" if executed else "commands sent", **(env_args or {})}
    with EpisodeWriter(path, args) as writer:
        for ep in range(episodes):
            rng = np.random.default_rng(seed + ep)
            actions = excitation_actions(steps, spec.action_dim, rng).astype(np.float32)  # (N, A)
            first = driver.reset(seed + ep)
            t0 = time.monotonic()
            obs, states = [first[key]], [driver.sim_state()] if has_state and not executed else []
            applied, t_sent = [], []
            t_next = t0
            if policy is not None:
                actions[0] = policy(np.asarray(first[key], np.float64), 0)
            for t in range(steps):
                t_send = time.monotonic()
                applied.append(driver.send_action(actions[t]))
                t_sent.append(0.5 * (t_send + time.monotonic()))  # when the driver took it
                if policy is not None and t + 1 < steps:  # the next command before the wait: it is sent
                    # at its random phase, not late by the policy's own time
                    actions[t + 1] = policy(np.asarray(driver.get_observation()[key], np.float64), t + 1)
                if driver.realtime:
                    t_next += period
                    wake = t_next + (rng.uniform(0.15, 0.85) * period if executed else 0.0)
                    time.sleep(max(0.0, wake - time.monotonic()))
                if not executed:
                    obs.append(driver.get_observation()[key])
                    if has_state:
                        states.append(driver.sim_state())
            if executed:
                rows = _executed_rows(driver, steps, period, applied, t_sent, t0, time_scale, key)
                writer.add_episode(obs={key: rows.pop("obs")}, actions=rows.pop("actions"), rewards=np.zeros(steps),
                                   dones=np.zeros(steps), next_obs={key: rows.pop("next_obs")}, extras=rows,
                                   attrs={"seed": seed + ep, "kind": "excitation"})
                continue
            o = np.asarray(obs)  # (N+1, O)
            extras = {"states": np.asarray(states[:-1])} if has_state else None  # state at each obs row
            writer.add_episode(obs={key: o[:-1]}, actions=np.asarray(applied), rewards=np.zeros(steps),
                               dones=np.zeros(steps), next_obs={key: o[1:]}, extras=extras,
                               attrs={"seed": seed + ep, "kind": "excitation"})
    return path


def _executed_rows(driver: Any, steps: int, period: float, applied: list[np.ndarray], t_sent: list[float],
                   t0: float, time_scale: float, key: str) -> dict[str, np.ndarray]:
    """The first ``steps`` executed steps of the episode as log arrays (see ``qc_robot.calibration.logs``)."""
    if not driver.wait_step(steps, 10 * steps * period):
        raise RuntimeError(f"the robot executed fewer than {steps} steps in the excitation episode")
    rows = driver.executed_steps()[:steps]
    sent = {np.asarray(a, np.float32).tobytes(): (i, ts) for i, (a, ts) in enumerate(zip(applied, t_sent, strict=True))}
    t_cmd = np.full(steps, -1.0)
    for i, r in enumerate(rows):  # which sent command each tick applied: the excitation's are all distinct
        if not r.held and (hit := sent.get(np.asarray(r.action, np.float32).tobytes())) is not None:
            t_cmd[i] = (hit[1] - t0) * time_scale
    out = {"obs": np.asarray([r.obs[key] for r in rows]), "actions": np.asarray([r.action for r in rows]),
           "next_obs": np.asarray([r.next_obs[key] for r in rows]),
           "held": np.asarray([r.held for r in rows], np.int8),
           "t_tick": (np.asarray([r.t for r in rows]) - t0) * time_scale, "t_sent": t_cmd}
    if all("state" in r.extra for r in rows):
        out["states"] = np.asarray([r.extra["state"] for r in rows])
    if all("ctrl" in r.extra for r in rows):  # the actuator targets each tick applied
        out["ctrl"] = np.asarray([r.extra["ctrl"] for r in rows])
    return out
