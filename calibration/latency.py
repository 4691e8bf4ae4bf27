"""Latency calibration through the real server and driver: distributions, not one number.

* **Round trip** (observation → chunk): the driver's own observations are sent to the policy
  server with the real client, ``n`` times; each reply's arrival is timed. Its p90 in control
  steps becomes the latency-aware executor's initial ``inference_delay_steps`` (the executor
  keeps measuring online; this is where it starts).
* **Actuation delay** (command → the robot moves): a step test on the driver. Hold still, read
  the observation's resting noise, then command a step and poll the observation until it leaves
  the resting band (mean squared z-score over the dims above ``k``, confirmed by a second read). A realtime robot applies commands on its own control
  ticks, so the response time is ``delay + U(0, period)``: the estimate is the median response
  minus half a period. Lockstep drivers count steps directly. The resting noise is reported too
  (``obs_noise_std``, the sim's sensor-noise setting).

Wall-clock times are multiplied by ``time_scale`` (a sped-up sim clock) to give robot time.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from qc_robot import protocol as P

log = logging.getLogger("qc_robot.calibration")


def distribution(x_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean, min, max and count of a list of milliseconds."""
    if not x_ms:
        raise ValueError("no samples")
    a = np.asarray(x_ms, np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def _flat(obs: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(obs[k], np.float64).ravel() for k in sorted(obs)])


def measure_rtt(client: Any, driver: Any, n: int = 50, timeout_s: float = 2.0,
                time_scale: float = 1.0) -> list[float]:
    """Round trips (robot ms) of ``n`` observation requests through a connected ``PolicyClient``."""
    out: list[float] = []
    for i in range(n):
        obs = driver.get_observation()
        t0 = time.monotonic()
        rid = client.request(obs, episode_id=0, step=i, reset=i == 0)
        if rid is None:
            time.sleep(0.01)
            continue
        reply = client.poll(timeout_s)
        dt = time.monotonic() - t0
        if isinstance(reply, P.Chunk):
            out.append(dt * 1e3 * time_scale)
        else:
            log.warning("request %d: %s", rid, "timeout" if reply is None else f"{reply.code}: {reply.message}")
            client.cancel(timed_out=reply is None)
    return out


def _hold(driver: Any) -> np.ndarray:
    return np.asarray(getattr(driver, "driver", driver).hold_action())  # SafeDriver wraps the driver


def _step_action(driver: Any, step_dim: int, value: float) -> np.ndarray:
    a = np.array(_hold(driver), np.float64)
    a[step_dim] = value
    return a


def measure_actuation(driver: Any, trials: int = 8, step_dim: int = 0, step_value: float = 0.5,
                      settle_steps: int = 10, max_steps: int = 20, k: float = 9.0, atol: float = 1e-3,
                      time_scale: float = 1.0, poll_s: float = 5e-4, seed: int = 0) -> tuple[list[float], float]:
    """Step tests: (response delays in robot ms, resting observation noise std).

    Trials alternate the step's sign so the robot stays near where it started.
    """
    period_robot = 1.0 / driver.spec.control_hz
    period = period_robot / time_scale  # wall seconds per control step
    delays: list[float] = []
    noise: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        hold = _hold(driver)
        rest = []
        for _ in range(settle_steps):  # hold still; the last half of the readings is the resting band
            driver.send_action(hold)
            if driver.realtime:
                time.sleep(period)
            rest.append(_flat(driver.get_observation()))
        band = np.asarray(rest[settle_steps // 3 :])  # (S, O) after the previous step's transient
        mean, std = band.mean(0), band.std(0, ddof=1)
        noise.append(std)
        scale = std + atol
        cmd = _step_action(driver, step_dim, step_value if trial % 2 == 0 else -step_value)

        def moved(obs: dict[str, np.ndarray], mean: np.ndarray = mean, scale: np.ndarray = scale) -> bool:
            # mean squared z-score over all dims: noise keeps it near 1, a response of a few dims
            # lifts it far above k; a single noisy read of one dim cannot
            return float(np.mean(np.square((_flat(obs) - mean) / scale))) > k

        if not driver.realtime:  # lockstep: count the steps until the response
            for n in range(max_steps):
                driver.send_action(cmd)
                if moved(driver.get_observation()):
                    delays.append(n * period_robot * 1e3)
                    break
            continue
        time.sleep(rng.uniform(0.0, period))  # a random phase against the robot's ticks
        t0 = time.monotonic()
        next_send = t0 + period
        driver.send_action(cmd)
        while time.monotonic() - t0 < max_steps * period:
            if moved(driver.get_observation()) and moved(driver.get_observation()):  # confirmed
                # the command waited U(0, period) for the robot's next tick: remove the mean wait
                delays.append(((time.monotonic() - t0) - period / 2) * time_scale * 1e3)
                break
            if time.monotonic() >= next_send:  # keep commanding: the robot holds without a command
                driver.send_action(cmd)
                next_send += period
            time.sleep(poll_s)
        else:
            log.warning("step test %d: no response within %d steps", trial, max_steps)
    noise_std = float(np.median(np.mean(noise, axis=0))) if noise else 0.0
    return delays, noise_std


def measure_latency(driver: Any, address: str, requests: int = 50, trials: int = 8, step_dim: int = 0,
                    step_value: float = 0.5, time_scale: float = 1.0, connect_timeout_s: float = 10.0,
                    seed: int = 0) -> dict[str, Any]:
    """The calibration's ``latency`` section: round trips via the server at ``address`` and step
    tests on ``driver`` (connected here; reset once)."""
    from drivers.client import PolicyClient  # pyzmq

    driver.connect()
    driver.reset(seed)
    hz = float(driver.spec.control_hz)
    client = PolicyClient(address, driver.spec.hello(driver.name, {"calibration": "latency"}))
    try:
        client.connect(connect_timeout_s)
        rtt = measure_rtt(client, driver, requests, time_scale=time_scale)
    finally:
        client.close()
    if not rtt:
        raise RuntimeError(f"no request to {address} was answered")
    act, noise = measure_actuation(driver, trials, step_dim, step_value, time_scale=time_scale, seed=seed)
    if not act:
        raise RuntimeError("the robot did not respond to any step command (check step_dim/step_value)")
    period_ms = 1e3 / hz
    rtt_d, act_d = distribution(rtt), distribution(act)
    # realtime: a reply is taken in at the next tick at the earliest, so the executor sees >= 1 step
    infer = max(1, math.ceil(rtt_d["p90"] / period_ms)) if driver.realtime else 0
    return {"rtt_ms": rtt_d, "actuation_ms": act_d, "inference_delay_steps": int(infer),
            "actuation_delay_steps": int(max(0, round(act_d["p50"] / period_ms))), "obs_noise_std": noise,
            "control_hz": hz, "time_scale": time_scale, "realtime": bool(driver.realtime),
            "server": address, "step_dim": step_dim, "step_value": step_value}
