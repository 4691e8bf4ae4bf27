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

import collections
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


def _still(window: np.ndarray, noise: np.ndarray | float, atol: float, k_still: float, order: int = 1) -> bool:
    """True when ``window`` (W, O) is at rest: the mean over dims of the squared ``order``-th
    difference between reads, in units of (noise + atol), stays under ``k_still`` for every read
    (pure noise gives about 2 for order 1, 6 for order 2; order 2 also accepts a steady drift)."""
    z = np.square(np.diff(window, n=order, axis=0) / (noise + atol))  # (W-order, O)
    return bool(z.mean(axis=1).max() <= k_still)


def measure_actuation(driver: Any, trials: int = 8, step_dim: int = 0, step_value: float = 0.5,
                      settle_steps: int = 10, max_steps: int = 40, k: float = 9.0, atol: float = 1e-3,
                      time_scale: float = 1.0, poll_s: float = 5e-4, seed: int = 0, still_steps: int = 5,
                      max_settle_steps: int = 40, k_still: float = 4.0, pulse_steps: int = 4) -> tuple[list[float], float]:
    """Step tests: (response delays in robot ms, resting observation noise std).

    Before each step the robot holds until it is *still*: at least ``settle_steps`` reads, and the
    last ``still_steps`` of them unchanged within noise (:func:`_still`). A long actuation delay
    keeps the previous trial's step command acting for that long after the hold is sent, so a
    fixed hold would read the resting band while the arm still moves and time the step late. The
    band is then the last ``still_steps`` reads, and a response is a departure from the band's
    straight-line extrapolation (a steady drift, such as a relative-command hold sagging under
    gravity, is not one). Each trial sends the step command for ``pulse_steps`` ticks, then holds:
    a step held for the whole delay moves the arm by delay x step, into the workspace bounds at
    long delays, where the next step has no effect; a short pulse moves it a little, and
    alternating signs bring it back. ``max_steps`` bounds the wait for a response (2 s at 20 Hz).
    """
    period_robot = 1.0 / driver.spec.control_hz
    period = period_robot / time_scale  # wall seconds per control step
    delays: list[float] = []
    noise: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    noise_est: np.ndarray | float = 0.0
    for trial in range(trials):
        info = driver.step_info()
        if info.terminated or info.truncated:  # a sim episode ended: its world no longer moves
            log.info("step test %d: the episode ended (time limit); resetting", trial)
            driver.reset(seed + 1 + trial)
        hold = _hold(driver)
        rest: list[np.ndarray] = []
        stamps: list[float] = []
        # the previous pulse is still in the pipe for about the delay measured last: outwait it first
        wait = settle_steps + (pulse_steps + int(np.ceil(delays[-1] / 1e3 / period_robot)) if delays else 0)
        for n in range(max_settle_steps + wait):  # hold until the arm is still
            driver.send_action(hold)
            if driver.realtime:
                time.sleep(period)
            rest.append(_flat(driver.get_observation()))
            stamps.append(time.monotonic() if driver.realtime else float(n))
            if n + 1 >= max(wait, still_steps + 2) and _still(np.asarray(rest[-still_steps - 2 :]), noise_est,
                                                                        atol, k_still):
                break
        else:
            log.warning("step test %d: the robot was not still after %d hold steps; reading the band anyway",
                        trial, max_settle_steps)
        band = np.asarray(rest[-still_steps:])  # (S, O) the still tail
        tb = np.asarray(stamps[-still_steps:]) - stamps[-1]  # (S,) read times, 0 = the last
        # a steady drift (a relative-command hold sagging under gravity) is part of the band: fit a
        # line per dim and detect departures from its extrapolation, not from the band's mean
        slope, icpt = np.polyfit(tb, band, 1) if len(tb) > 2 else (np.zeros(band.shape[1]), band.mean(0))
        std = (band - (icpt + np.outer(tb, slope))).std(0, ddof=2 if len(tb) > 2 else 1)
        # a band that still moved only inflates the spread: keep the smallest seen as the noise
        noise_est = std if trial == 0 else np.minimum(noise_est, std)
        noise.append(std)
        scale = np.asarray(noise_est) + atol
        cmd = _step_action(driver, step_dim, step_value if trial % 2 == 0 else -step_value)
        t_band = stamps[-1]
        zmax = [0.0]

        hist = collections.deque(zip(stamps[-still_steps:], rest[-still_steps:], strict=True), maxlen=4096)
        horizon = period if driver.realtime else 1.0

        def moved(obs: dict[str, np.ndarray], slope: np.ndarray = slope, scale: np.ndarray = scale,
                  hist: collections.deque = hist, at: float | None = None, horizon: float = horizon,
                  zmax: list[float] = zmax) -> bool:
            # the read against the one a tick earlier advanced by the band's drift: a steady or
            # slowly bending drift stays near zero, the tick that applies the step jumps. The
            # mean squared z-score over all dims: noise keeps it near 1, a response lifts it far
            # above k; a single noisy read of one dim cannot
            now = time.monotonic() if at is None else at
            x = _flat(obs)
            t_ref, ref = next(((t, o) for t, o in reversed(hist) if t <= now - horizon + 1e-9), hist[0])
            hist.append((now, x))
            z = float(np.mean(np.square((x - ref - slope * (now - t_ref)) / scale)))
            zmax[0] = max(zmax[0], z)
            return z > k

        if not driver.realtime:  # lockstep: count the steps until the response
            first = None
            for n in range(max_steps):
                driver.send_action(cmd if n < pulse_steps else hold)
                if not moved(driver.get_observation(), at=t_band + n + 1):
                    first = None
                elif first is None:
                    first = n
                else:  # confirmed on the next step: a response lasts, a contact blip does not
                    delays.append(first * period_robot * 1e3)
                    break
            continue
        time.sleep(rng.uniform(0.0, period))  # a random phase against the robot's ticks
        t0 = time.monotonic()
        next_send, sent = t0 + period, 1
        driver.send_action(cmd)
        first_hit: float | None = None
        while time.monotonic() - t0 < max_steps * period:
            now = time.monotonic()
            if not moved(driver.get_observation(), at=now):
                first_hit = None if first_hit is None or now >= first_hit + period else first_hit
            elif first_hit is None:
                first_hit = now
            elif now >= first_hit + period:  # still departing a tick later: a response, not a blip
                # the command waited U(0, period) for the robot's next tick: remove the mean wait
                delays.append(((first_hit - t0) - period / 2) * time_scale * 1e3)
                break
            if time.monotonic() >= next_send:  # the step for pulse_steps ticks, then holds
                driver.send_action(cmd if sent < pulse_steps else hold)
                next_send, sent = next_send + period, sent + 1
            time.sleep(poll_s)
        else:
            log.warning("step test %d: no response within %d steps (largest departure z^2 %.2f of %.1f)", trial,
                        max_steps, zmax[0], k)
    noise_std = float(np.median(np.mean(noise, axis=0))) if noise else 0.0
    return delays, noise_std


def measure_latency(driver: Any, address: str, requests: int = 50, trials: int = 8, step_dim: int = 0,
                    step_value: float = 0.5, time_scale: float = 1.0, connect_timeout_s: float = 10.0,
                    seed: int = 0) -> dict[str, Any]:
    """The calibration's ``latency`` section: round trips via the server at ``address`` and step
    tests on ``driver`` (connected here; reset once)."""
    from qc_robot.drivers.client import PolicyClient  # pyzmq

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
