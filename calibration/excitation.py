"""Excitation logs for system identification: drive a robot with smooth random commands, log HDF5.

The signal is a first-order low-pass of Gaussian noise (``a_t = ρ a_{t-1} + (1-ρ) ε_t``, clipped),
rich enough to excite the servo's stiffness and damping but smooth enough to stay inside the
workspace and safe on hardware. Any driver works (through the safety layer on a real robot);
drivers with a ``sim_state()`` (the sim) also log MuJoCo ``states`` for exact replays.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def excitation_actions(steps: int, action_dim: int, rng: np.random.Generator, amplitude: float = 0.6,
                       smoothing: float = 0.6, gripper_dim: int | None = 4) -> np.ndarray:
    """(steps, action_dim) smooth random commands in [-1, 1]. ``gripper_dim`` (OGBench: 4) gets a
    slow open/close square wave instead, so the gripper is excited without chattering."""
    a = np.zeros((steps, action_dim))
    prev = np.zeros(action_dim)
    # the low-pass shrinks the std by sqrt((1-ρ)/(1+ρ)): scale the noise up so the output has `amplitude`
    gain = amplitude * np.sqrt((1 + smoothing) / (1 - smoothing))
    for t in range(steps):
        prev = smoothing * prev + (1 - smoothing) * rng.normal(0.0, gain, action_dim)
        a[t] = prev
    if gripper_dim is not None and gripper_dim < action_dim:
        a[:, gripper_dim] = np.where((np.arange(steps) // 15) % 2 == 0, -0.5, 0.5)
    return np.clip(a, -1.0, 1.0)


def record_excitation(driver: Any, path: str, episodes: int = 3, steps: int = 50, seed: int = 0,
                      env_args: dict[str, Any] | None = None, time_scale: float = 1.0) -> str:
    """Run ``episodes`` excitation episodes on ``driver`` (connected or not) and write them to ``path``.

    Realtime drivers are paced at their control rate (× ``time_scale``); the observation logged
    after each command is the one read one period later, as the control loop would see it.
    """
    from qc_robot.data.hdf5_io import EpisodeWriter

    driver.connect()
    spec = driver.spec
    key = spec.obs_fields[0].key
    has_state = callable(getattr(driver, "sim_state", None))
    period = 1.0 / (spec.control_hz * time_scale)
    args = {"source": "qc-robot calibrate excite", "driver": driver.name, "control_hz": spec.control_hz,
            "calibration_id": getattr(driver, "calibration_id", ""), **(env_args or {})}
    with EpisodeWriter(path, args) as writer:
        for ep in range(episodes):
            rng = np.random.default_rng(seed + ep)
            actions = excitation_actions(steps, spec.action_dim, rng).astype(np.float32)  # (N, A)
            obs = [driver.reset(seed + ep)[key]]
            states = [driver.sim_state()] if has_state else []
            applied = []
            t_next = time.monotonic()
            for t in range(steps):
                applied.append(driver.send_action(actions[t]))
                if driver.realtime:
                    t_next += period
                    time.sleep(max(0.0, t_next - time.monotonic()))
                obs.append(driver.get_observation()[key])
                if has_state:
                    states.append(driver.sim_state())
            o = np.asarray(obs)  # (N+1, O)
            extras = {"states": np.asarray(states[:-1])} if has_state else None  # state at each obs row
            writer.add_episode(obs={key: o[:-1]}, actions=np.asarray(applied), rewards=np.zeros(steps),
                               dones=np.zeros(steps), next_obs={key: o[1:]}, extras=extras,
                               attrs={"seed": seed + ep, "kind": "excitation"})
    return path
