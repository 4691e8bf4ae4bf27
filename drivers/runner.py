"""The control loop: at the control rate, observation → executor → safety → driver.

``run_drive`` is ``qc-robot drive``: it builds the driver (always behind the safety layer), connects
to the server, runs episodes and prints per-episode and total success.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.files import load_calibration
from drivers.client import HandshakeError, PolicyClient
from drivers.config import DriveConfig
from drivers.executor import ChunkExecutor
from drivers.registry import driver_config, make_driver
from drivers.safety import SafeDriver
from qc_robot import protocol as P

log = logging.getLogger("qc_robot.runner")


class Pacer:
    """Fixed-rate ticks on the monotonic clock; records how late each tick starts."""

    def __init__(self, hz: float) -> None:
        self.period = 1.0 / hz
        self._next = time.monotonic()
        self.lateness_s: list[float] = []
        self.overruns = 0

    def start(self) -> None:
        self._next = time.monotonic()

    def wait(self, idle: Callable[[float], None] | None = None) -> None:
        """Sleep until the next tick; a tick more than a period late resets the schedule.

        ``idle(deadline)`` may use the time instead of sleeping (it must return by ``deadline``).
        """
        self._next += self.period
        if idle is not None:
            idle(self._next)
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late = time.monotonic() - self._next
        if len(self.lateness_s) < 1_000_000:
            self.lateness_s.append(late)
        if late > self.period:
            self.overruns += 1
            self._next = time.monotonic()  # do not burst to catch up


@dataclass
class EpisodeResult:
    index: int
    success: bool
    steps: int
    """Control-loop ticks."""
    robot_steps: int
    """Steps the robot executed (its own clock; equals ``steps`` for lockstep drivers)."""
    held: int
    chunks: int
    duration_s: float
    rtt_ms: list[float] = field(default_factory=list)


class _TransitionSender:
    """Buffers (obs, applied action, reward, flags, next obs) rows; sends one message per chunk."""

    def __init__(self, client: PolicyClient, every: int) -> None:
        self.client, self.every = client, max(1, every)
        self.rows: list[tuple[dict[str, np.ndarray], np.ndarray, float, bool, bool]] = []
        self.start_step = 0

    def add(self, obs: dict[str, np.ndarray], action: np.ndarray, reward: float, term: bool, trunc: bool) -> None:
        self.rows.append((obs, action, reward, term, trunc))

    def flush(self, next_obs: dict[str, np.ndarray], episode_id: int, success: bool, force: bool = False) -> None:
        """Send the complete rows (all of them if ``force``); the last row's next obs is ``next_obs``."""
        n = len(self.rows) if force else len(self.rows) // self.every * self.every
        if n <= 0:
            return
        nexts = [r[0] for r in self.rows[1 : n + 1]]  # row i's next obs is row i+1's obs
        if len(nexts) < n:
            nexts.append(next_obs)
        rows, self.rows = self.rows[:n], self.rows[n:]
        keys = rows[0][0].keys()
        self.client.send_transition(P.Transition(
            episode_id=episode_id, start_step=self.start_step,
            obs={k: np.stack([r[0][k] for r in rows]) for k in keys},
            actions=np.stack([r[1] for r in rows]).astype(np.float32),
            rewards=np.asarray([r[2] for r in rows], np.float32),
            terminals=np.asarray([r[3] for r in rows], bool), truncated=np.asarray([r[4] for r in rows], bool),
            next_obs={k: np.stack([o[k] for o in nexts]) for k in keys}, success=success))
        self.start_step += n


def run_episode(driver: SafeDriver, executor: ChunkExecutor, episode_id: int, seed: int | None,
                pacer: Pacer | None = None, client: PolicyClient | None = None,
                send_transitions: bool = False, max_steps: int = 0) -> EpisodeResult:
    """One episode; ``pacer`` paces realtime drivers (None: as fast as lockstep allows)."""
    t0 = time.monotonic()
    obs = driver.reset(seed)
    executor.reset()
    held0, chunks0, rtt0 = driver.stats.held, executor.stats.chunks, len(executor.stats.rtt_ms)
    limit = max_steps or (driver.spec.max_episode_steps * 2 if driver.spec.max_episode_steps else 100_000)
    sender = _TransitionSender(client, executor.chunk_len) if (client and send_transitions) else None
    success, step = False, 0
    if pacer is not None:
        pacer.start()
    while step < limit:
        if step > 0:
            obs = driver.get_observation()
            if sender is not None:
                sender.flush(obs, episode_id, success)
        applied = driver.act(executor.act(obs, step, episode_id))
        info = driver.step_info()
        success = success or info.success
        if sender is not None:
            sender.add(obs, applied, info.reward, info.terminated, info.truncated)
        step += 1
        if client is not None:
            client.heartbeat()
        if info.terminated or info.truncated:
            break
        if pacer is not None:
            pacer.wait(functools.partial(_idle, executor, next_step=step))
    if sender is not None:
        sender.flush(driver.get_observation(), episode_id, success, force=True)
    return EpisodeResult(episode_id, success, step, driver.step_info().step, driver.stats.held - held0,
                         executor.stats.chunks - chunks0, time.monotonic() - t0, executor.stats.rtt_ms[rtt0:])


def _idle(executor: ChunkExecutor, deadline: float, next_step: int) -> None:
    executor.idle(deadline, next_step)


def build_driver(cfg: DriveConfig) -> SafeDriver:
    """The configured driver behind the safety layer (watchdog on the robot's scaled clock)."""
    values: dict[str, Any] = dict(env=cfg.env.name, sparse_reward=cfg.env.sparse_reward,
                                  max_episode_steps=cfg.env.max_episode_steps, realtime=cfg.realtime,
                                  time_scale=cfg.time_scale, latency_ms=cfg.latency_ms,
                                  obs_noise=cfg.obs_noise, seed=cfg.seed, calibration=cfg.calibration,
                                  randomize=cfg.randomize_physics)
    values.update(cfg.driver_args)
    scale = cfg.time_scale
    return SafeDriver(make_driver(cfg.driver, driver_config(cfg.driver, **values)), cfg.safety,
                      clock=lambda: time.monotonic() * scale)


def run_drive(cfg: DriveConfig) -> int:
    """``qc-robot drive``: run ``cfg.episodes`` episodes against the server; prints success."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        driver = build_driver(cfg)
        cal = load_calibration(cfg.calibration, task=cfg.env.name if cfg.driver == "sim" else None) \
            if cfg.calibration else None
    except ValueError as e:  # CalibrationError is a ValueError
        print(f"drive: {e}")
        return 2
    driver.connect()
    meta = {"mode": cfg.mode, "calibration_id": cal.id if cal is not None else ""}
    client = PolicyClient(cfg.server, driver.spec.hello(cfg.driver, meta))
    try:
        welcome = client.connect(cfg.connect_timeout_s)
    except HandshakeError as e:
        print(f"drive: {e}")
        driver.close()
        return 2
    print(f"connected to {cfg.server}: policy {welcome.policy_version} ({welcome.actor_type}), "
          f"H={welcome.chunk_len}, session {welcome.session}; mode {cfg.mode}, driver {cfg.driver}")
    executor = ChunkExecutor(client, welcome.chunk_len, cfg.mode, cfg.request_threshold, cfg.request_timeout_s,
                             wait_when_empty=not driver.realtime,
                             tick_wait_s=cfg.tick_wait / (driver.spec.control_hz * cfg.time_scale) if driver.realtime else 0.0,
                             initial_delay_steps=cal.inference_delay_steps if cal is not None else 0)
    pacer = Pacer(driver.spec.control_hz * cfg.time_scale) if driver.realtime else None
    results: list[EpisodeResult] = []
    try:
        for i in range(cfg.episodes):
            r = run_episode(driver, executor, i, cfg.seed + i, pacer, client, cfg.send_transitions)
            results.append(r)
            rtt = f"{np.median(r.rtt_ms):.1f} ms" if r.rtt_ms else "n/a"
            print(f"episode {i + 1}/{cfg.episodes}: {'success' if r.success else 'failure'}  steps {r.steps} "
                  f"(robot {r.robot_steps})  chunks {r.chunks}  held {r.held}  rtt p50 {rtt}  "
                  f"{r.duration_s:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        client.close()
        driver.close()
    n_ok = sum(r.success for r in results)
    pct = 100.0 * n_ok / max(1, len(results))
    print(f"success {n_ok}/{len(results)} ({pct:.1f}%)  requests {executor.stats.requests}  timeouts "
          f"{executor.stats.timeouts}  stale actions dropped {executor.stats.dropped_stale}  "
          f"safety: held {driver.stats.held}, rejected {driver.stats.rejected}, trips {driver.stats.trips}")
    return 0
