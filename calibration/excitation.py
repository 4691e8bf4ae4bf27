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
    after each command is the one read one period later, as the control loop would see it. A
    realtime driver with ``observe_stamped()`` (the controller's tick count and the time of the state
    an observation shows, on this host's ``time.monotonic`` clock) gets the timing fields of ``calibration.logs`` logged too, and one with
    a ``tick_log`` (which command each tick applied) also ``tick_src``: sysid then replays what the
    robot experienced tick by tick instead of assuming one command per step.
    """
    from qc_robot.data.hdf5_io import EpisodeWriter

    driver.connect()
    spec = driver.spec
    key = spec.obs_fields[0].key
    has_state = callable(getattr(driver, "sim_state", None))
    stamped = bool(driver.realtime) and callable(getattr(driver, "observe_stamped", None))
    period = 1.0 / (spec.control_hz * time_scale)
    args = {"source": "qc-robot calibrate excite", "driver": driver.name, "control_hz": spec.control_hz,
            "calibration_id": getattr(driver, "calibration_id", ""), "realtime": bool(driver.realtime),
            **(env_args or {})}
    with EpisodeWriter(path, args) as writer:
        for ep in range(episodes):
            rng = np.random.default_rng(seed + ep)
            actions = excitation_actions(steps, spec.action_dim, rng).astype(np.float32)  # (N, A)
            first = driver.reset(seed + ep)
            stamps: list[tuple[int, float]] = []
            if stamped:
                o, state = _stamped_start(driver, has_state, stamps)
                obs, states = [o[key]], [state] if has_state else []
            else:
                obs, states = [first[key]], [driver.sim_state()] if has_state else []
            applied, t_act = [], []
            t_next = stamps[0][1] if stamped else time.monotonic()
            for t in range(steps):
                t_send = time.monotonic()
                applied.append(driver.send_action(actions[t]))
                t_act.append(0.5 * (t_send + time.monotonic()))  # when the driver took it
                if driver.realtime:
                    t_next += period
                    # stamped: read and send at a random phase between the robot's ticks, so the
                    # sends do not race the ticks and the log pins the latency down finely
                    wake = t_next + (rng.uniform(0.15, 0.85) * period if stamped else 0.0)
                    time.sleep(max(0.0, wake - time.monotonic()))
                if stamped:
                    o, tick, t_tick = driver.observe_stamped()
                    stamps.append((tick, t_tick))
                else:
                    o = driver.get_observation()
                obs.append(o[key])
                if has_state:
                    states.append(driver.sim_state())
            o = np.asarray(obs)  # (N+1, O)
            extras: dict[str, np.ndarray] = {"states": np.asarray(states[:-1])} if has_state else {}
            if stamped:
                extras.update(_timing(stamps, t_act, getattr(driver, "tick_log", None), time_scale))
            writer.add_episode(obs={key: o[:-1]}, actions=np.asarray(applied), rewards=np.zeros(steps),
                               dones=np.zeros(steps), next_obs={key: o[1:]}, extras=extras or None,
                               attrs={"seed": seed + ep, "kind": "excitation"})
    return path


def _stamped_start(driver: Any, has_state: bool, stamps: list[tuple[int, float]]) -> tuple[Any, Any]:
    """First observation (and sim state) of a realtime episode, both of the same tick."""
    while True:
        o, tick, t = driver.observe_stamped()
        state = driver.sim_state() if has_state else None
        if driver.observe_stamped()[1] == tick:  # no tick in between: obs and state agree
            stamps.append((tick, t))
            return o, state


def _timing(stamps: list[tuple[int, float]], t_act: list[float], tick_log: Any,
            time_scale: float) -> dict[str, np.ndarray]:
    """The realtime fields of ``calibration.logs`` from the stamps of the N+1 observations, the N
    send times (monotonic) and the driver's tick log (or None), in robot seconds since tick 0."""
    ticks = np.array([s[0] for s in stamps])  # (N+1,)
    t0 = stamps[0][1]
    counts = np.diff(ticks)  # (N,)
    m = max(1, int(counts.max(initial=0)))
    n = len(counts)
    log = {int(k): (float(tt), int(seq)) for k, tt, seq in (tick_log or [])}
    times = np.zeros((n, m))
    src = np.full((n, m), -2, np.int64)
    for i in range(n):
        t_end = (stamps[i + 1][1] - t0) * time_scale
        t_start = (stamps[i][1] - t0) * time_scale
        for j in range(m):
            k = int(ticks[i]) + 1 + min(j, max(int(counts[i]) - 1, 0))
            if k in log:
                times[i, j] = (log[k][0] - t0) * time_scale
                if j < counts[i]:
                    src[i, j] = log[k][1]
            else:  # no tick log: the last tick's time is stamped; earlier ones at even spacing
                c = max(int(counts[i]), 1)
                times[i, j] = t_start + (t_end - t_start) * min(j + 1, c) / c
    out = {"t_act": (np.asarray(t_act) - t0) * time_scale, "tick_count": counts.astype(np.int64), "tick_time": times}
    if tick_log is not None:
        out["tick_src"] = src
    return out
