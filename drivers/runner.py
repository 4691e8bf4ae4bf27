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

from qc_robot import protocol as P
from qc_robot.calibration.files import load_calibration
from qc_robot.drivers.base import ExecutedStep, StepInfo
from qc_robot.drivers.client import HandshakeError, PolicyClient
from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.outbox import Outbox
from qc_robot.drivers.registry import build_driver_config, make_driver
from qc_robot.drivers.safety import SafeDriver
from qc_robot.drivers.shutdown import sigterm_as_interrupt

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


class PolicyPace:
    """Lockstep pacing to a learner: after every ``every`` executed steps, act again only with a
    chunk from a policy newer than the one that produced them (waiting up to ``timeout_s``).

    With a learner that pushes every ``every · utd`` updates, the robot then waits for training
    exactly as the in-process loop does: each block of steps is acted by the policy that trained
    on every step before it. The wait is measured, and a learner that never answers costs one
    ``timeout_s`` per block, not a dead robot.
    """

    def __init__(self, every: int, timeout_s: float = 60.0) -> None:
        if every <= 0:
            raise ValueError("pace every must be > 0")
        self.every, self.timeout_s = every, timeout_s
        self.steps = 0
        self.version: str | None = None
        self.blocks = 0
        self.timeouts = 0
        self.wait_s = 0.0
        self._since: float | None = None

    @property
    def due(self) -> bool:
        """The current block is complete: the next chunk must come from a newer policy."""
        return self.version is not None and self.steps >= self.every

    def executed(self, n: int) -> None:
        self.steps += n

    def accept(self, chunk: P.Chunk) -> bool:
        if self.version is None or chunk.policy_version != self.version:
            self._new_block(chunk.policy_version)
            return True
        if not self.due:
            return True
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since >= self.timeout_s:
            log.warning("no newer policy than %s after %.0f s: acting with it again", self.version, self.timeout_s)
            self.timeouts += 1
            self._new_block(chunk.policy_version)
            return True
        return False

    def _new_block(self, version: str) -> None:
        if self._since is not None:
            self.wait_s += time.monotonic() - self._since
        self.version, self.steps, self._since = version, 0, None
        self.blocks += 1


@dataclass
class EpisodeResult:
    index: int
    success: bool
    steps: int
    """Control-loop ticks (commands sent)."""
    robot_steps: int
    """Steps the robot executed (its own clock; equals ``steps`` for lockstep drivers)."""
    held: int
    """Ticks the safety layer held (no fresh action from the executor)."""
    chunks: int
    duration_s: float
    rtt_ms: list[float] = field(default_factory=list)
    rows: int = 0
    """Transition rows produced: exactly one per executed robot step."""
    robot_held: int = 0
    """Robot ticks that found no new command and applied the hold (realtime drivers)."""
    overruns: int = 0
    """Waits of the loop for the robot's next step that ran past 1.5 control periods: the world did
    not advance when it should have (load, a stalled robot). Never a transition row."""
    offline_s: float = 0.0
    """Seconds of this episode without a server session (the robot held meanwhile)."""


class _TransitionSender:
    """Streams executed steps as Transition messages, one per ``every`` rows (a chunk) and at the end."""

    def __init__(self, client: PolicyClient, every: int) -> None:
        self.client, self.every = client, max(1, every)
        self.rows: list[ExecutedStep] = []
        self.start_step = 0
        self.success = False

    def add(self, row: ExecutedStep) -> None:
        self.rows.append(row)

    def flush(self, episode_id: int, force: bool = False) -> None:
        """Send the complete chunks of rows (all of them if ``force``)."""
        n = len(self.rows) if force else len(self.rows) // self.every * self.every
        if n <= 0:
            return
        rows, self.rows = self.rows[:n], self.rows[n:]
        per = self._rows_per_message(rows[0])
        for i in range(0, n, per):  # consecutive messages: the server's size limit holds with images too
            self._send(episode_id, rows[i:i + per])

    def _rows_per_message(self, row: ExecutedStep) -> int:
        """Rows that fit the server's advertised message limit (with a quarter left for framing)."""
        w = self.client.welcome
        limit = int(w.metadata.get("max_message_bytes", P.MAX_MESSAGE_BYTES)) if w is not None else P.MAX_MESSAGE_BYTES
        row_bytes = sum(v.nbytes for v in row.obs.values()) + sum(v.nbytes for v in row.next_obs.values())
        row_bytes += row.action.nbytes + 64
        return max(1, int(0.75 * limit) // row_bytes)

    def _send(self, episode_id: int, rows: list[ExecutedStep]) -> None:
        self.success = self.success or any(r.success for r in rows)  # succeeded by the last row sent
        keys = rows[0].obs.keys()
        self.client.send_transition(P.Transition(
            episode_id=episode_id, start_step=self.start_step,
            obs={k: np.stack([r.obs[k] for r in rows]) for k in keys},
            actions=np.stack([r.action for r in rows]).astype(np.float32),
            rewards=np.asarray([r.reward for r in rows], np.float32),
            terminals=np.asarray([r.terminated for r in rows], bool),
            truncated=np.asarray([r.truncated for r in rows], bool),
            next_obs={k: np.stack([r.next_obs[k] for r in rows]) for k in keys}, success=self.success,
            timestamps=np.asarray([r.wall_time for r in rows], np.float64),
            held=np.asarray([r.held for r in rows], bool)))
        self.start_step += len(rows)


def _snapshot(driver: SafeDriver) -> tuple[dict[str, np.ndarray], StepInfo]:
    """The latest observation and the step info of the same robot step (retried across a tick)."""
    while True:
        info = driver.step_info()
        obs = driver.get_observation()
        again = driver.step_info()
        if again.step == info.step:
            return obs, again


def run_episode(driver: SafeDriver, executor: ChunkExecutor, episode_id: int, seed: int | None,
                pacer: Pacer | None = None, client: PolicyClient | None = None,
                send_transitions: bool = False, max_steps: int = 0,
                on_rows: Callable[[list[ExecutedStep]], None] | None = None,
                stall_timeout_s: float = 5.0, pace: PolicyPace | None = None) -> EpisodeResult:
    """One episode; returns its result.

    Rows (for ``send_transitions`` and ``on_rows``) are exact: one per step the robot executed,
    never one for a tick where the world did not advance, and none after the episode's end. A
    lockstep driver's row is composed here (observation read, action applied, the step's outcome,
    the next observation). A realtime driver's rows are its own record of its ticks
    (``Driver.executed_steps``), and the loop follows the robot's clock: after each command it
    waits for the robot's next step (taking chunk replies meanwhile), so every command is read
    from the newest state and reaches the robot before the tick that applies it. ``pacer`` only
    paces a realtime driver that keeps no log of its own (its period is used otherwise).
    """
    t0 = time.monotonic()
    obs = driver.reset(seed)
    executor.reset()
    held0, chunks0, rtt0 = driver.stats.held, executor.stats.chunks, len(executor.stats.rtt_ms)
    offline0 = client.offline_now if client is not None else 0.0
    limit = max_steps or (driver.spec.max_episode_steps * 2 if driver.spec.max_episode_steps else 100_000)
    sender = _TransitionSender(client, executor.chunk_len) if (client and send_transitions) else None
    period = pacer.period if pacer is not None else 1.0 / driver.spec.control_hz
    res = EpisodeResult(episode_id, False, 0, 0, 0, 0, 0.0)
    info = driver.step_info()
    last: ExecutedStep | None = None
    alive = True
    if pacer is not None:
        pacer.start()
    while True:
        if driver.sensor_fault is not None:  # a stale/failed camera: hold, and drop the plans made
            executor.reset()  # before it, so none of them runs once the sensors are current again
            action = None
        else:
            action = executor.act(obs, res.steps, episode_id)
        held_before = driver.stats.held
        applied = driver.act(action)
        res.steps += 1
        if client is not None:
            client.heartbeat()
        if not driver.realtime:  # lockstep: send_action executed exactly this one step
            nxt, new = _snapshot(driver)
            rows = [ExecutedStep(res.steps - 1, obs, applied, driver.stats.held > held_before, new.reward, new.success,
                                 new.terminated, new.truncated, nxt, time.monotonic(), time.time())]
        else:
            nxt, new, rows, alive = _realtime_wait(driver, executor, pacer, period, info, obs, applied, res,
                                                   stall_timeout_s)
        obs, info = nxt, new
        last = rows[-1] if rows else last
        ended = (last is not None and (last.terminated or last.truncated)) or new.terminated or new.truncated \
            or not alive or res.steps >= limit
        if ended and last is not None and not (last.terminated or last.truncated):
            last.truncated = True  # the loop ends the episode here (its step limit, a stalled robot)
        for r in rows:
            res.success = res.success or r.success
            res.robot_held += r.held and driver.realtime
            if sender is not None:
                sender.add(r)
        res.rows += len(rows)
        if on_rows is not None and rows:
            on_rows(rows)
        if pace is not None:
            pace.executed(len(rows))
        if sender is not None:  # a complete pacing block goes out whole: the learner needs all of it
            sender.flush(episode_id, force=ended or (pace is not None and pace.due))
        if ended:
            break
    res.robot_steps = driver.step_info().step if not driver.realtime else (last.step + 1 if last else 0)
    res.held = driver.stats.held - held0
    res.chunks = executor.stats.chunks - chunks0
    res.duration_s = time.monotonic() - t0
    res.rtt_ms = executor.stats.rtt_ms[rtt0:]
    res.offline_s = client.offline_now - offline0 if client is not None else 0.0
    return res


def _realtime_wait(driver: SafeDriver, executor: ChunkExecutor, pacer: Pacer | None, period: float,
                   info: StepInfo, obs: dict[str, np.ndarray], applied: np.ndarray, res: EpisodeResult,
                   stall_timeout_s: float) -> tuple[dict[str, np.ndarray], StepInfo, list[ExecutedStep], bool]:
    """After a command: wait for the robot's next step. Returns (newest obs, its info, the rows of
    the steps executed meanwhile, whether the robot is still stepping)."""
    target = info.step + 1
    if not driver.logs_steps:  # no log of its own: pace on our clock, a row only for exactly one step
        if pacer is not None:
            pacer.wait(functools.partial(_idle, executor, next_step=res.steps))
        nxt, new = _snapshot(driver)
        if new.step != target:
            res.overruns += 1  # no step (the world did not advance) or several we did not see apart
            return nxt, new, [], True
        return nxt, new, [ExecutedStep(info.step, obs, applied, driver.last_held, new.reward, new.success, new.terminated,
                                       new.truncated, nxt, time.monotonic(), time.time())], True
    expected = (info.time or time.monotonic()) + period  # when the robot's next tick is due
    executor.idle(min(expected, time.monotonic() + period), res.steps)  # take replies meanwhile
    waited, alive = 0.0, True
    while not driver.wait_step(target, 1.5 * period if waited == 0.0 else period):
        res.overruns += 1
        waited += period
        now = driver.step_info()
        if now.terminated or now.truncated:
            break
        if waited >= stall_timeout_s:
            log.error("the robot executed no step for %.1f s: ending the episode", waited)
            alive = False
            break
        executor.idle(time.monotonic() + 0.1 * period, res.steps)
    nxt, new = _snapshot(driver)
    rows = driver.executed_steps() or []
    return nxt, new, rows, alive


def _idle(executor: ChunkExecutor, deadline: float, next_step: int) -> None:
    executor.idle(deadline, next_step)


def _drain(client: PolicyClient, outbox: Outbox, timeout_s: float) -> None:
    """Deliver what the outbox holds before leaving (what is left stays on disk for the next run)."""
    deadline = time.monotonic() + timeout_s
    while outbox.pending and time.monotonic() < deadline:
        client.heartbeat()
        client.poll(0.02)
    if outbox.pending:
        print(f"outbox: {outbox.pending} transitions not yet acknowledged: kept in {outbox.dir} for the next run")
    outbox.close()


def build_driver(cfg: DriveConfig) -> SafeDriver:
    """The configured driver behind the safety layer (watchdog on the robot's scaled clock)."""
    values: dict[str, Any] = dict(env=cfg.env.name, sparse_reward=cfg.env.sparse_reward,
                                  max_episode_steps=cfg.env.max_episode_steps, realtime=cfg.realtime,
                                  time_scale=cfg.time_scale, latency_ms=cfg.latency_ms,
                                  obs_noise=cfg.obs_noise, seed=cfg.seed, calibration=cfg.calibration,
                                  randomize=cfg.randomize_physics,
                                  image_size=cfg.env.image_size, image_key=cfg.env.image_key,
                                  camera=cfg.env.camera, render_fast=cfg.env.render_fast)
    scale = cfg.time_scale
    driver = make_driver(cfg.driver, build_driver_config(cfg.driver, values, cfg.driver_args))
    if cfg.cameras:
        from qc_robot.drivers.camera_driver import CameraDriver

        driver = CameraDriver(driver, cfg.cameras)
    return SafeDriver(driver, cfg.safety, clock=lambda: time.monotonic() * scale)


def run_drive(cfg: DriveConfig) -> int:
    """``qc-robot drive``: run ``cfg.episodes`` episodes against the server; prints success.
    SIGTERM ends it like Ctrl-C: the arm is stopped, parked and released (``drivers/shutdown.py``)."""
    with sigterm_as_interrupt():
        return _run_drive(cfg)


def _run_drive(cfg: DriveConfig) -> int:
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
    try:
        curve = _client_curve(cfg)
    except (OSError, ValueError) as e:
        print(f"drive: CURVE keys: {e}")
        driver.close()
        return 2
    outbox = Outbox(cfg.outbox_dir, max_bytes=cfg.outbox_max_mb << 20) if cfg.outbox_dir else None
    if outbox is not None:
        meta["outbox"] = outbox.id
    client = PolicyClient(cfg.server, driver.spec.hello(cfg.driver, meta), curve=curve, outbox=outbox,
                          jpeg_quality=cfg.jpeg_quality)
    try:
        welcome = client.connect(cfg.connect_timeout_s)
    except HandshakeError as e:
        print(f"drive: {e}")
        driver.close()
        return 2
    print(f"connected to {cfg.server}: policy {welcome.policy_version} ({welcome.actor_type}), "
          f"H={welcome.chunk_len}, session {welcome.session}; mode {cfg.mode}, driver {cfg.driver}")
    pace = PolicyPace(cfg.pace_every, cfg.pace_timeout_s) if cfg.pace_every and not driver.realtime else None
    if cfg.pace_every and driver.realtime:
        print("drive: pace_every applies to lockstep drivers only (a realtime robot cannot wait): ignored")
    executor = ChunkExecutor(client, welcome.chunk_len, cfg.mode, cfg.request_threshold, cfg.request_timeout_s,
                             wait_when_empty=not driver.realtime, gate=pace.accept if pace is not None else None,
                             tick_wait_s=cfg.tick_wait / (driver.spec.control_hz * cfg.time_scale) if driver.realtime else 0.0,
                             initial_delay_steps=cal.inference_delay_steps if cal is not None else 0)
    pacer = Pacer(driver.spec.control_hz * cfg.time_scale) if driver.realtime else None
    results: list[EpisodeResult] = []
    video = None
    if cfg.video:  # lockstep sim only (checked by the CLI): rendering is slower than a control period
        from qc_robot.video import DriverVideo

        video = DriverVideo(cfg.video, driver.driver, cfg.video_episodes)
    view = None
    if cfg.viz:  # a live view of the loop in Rerun (the viz extra)
        from qc_robot.liveview import RerunView

        view = RerunView(cfg.viz, executor)
    try:
        for i in range(cfg.episodes):
            from qc_robot.liveview import chain

            on_rows = chain(video.episode(i) if video is not None else None,
                            view.episode(i) if view is not None else None)
            r = run_episode(driver, executor, i, cfg.seed + i, pacer, client, cfg.send_transitions,
                            on_rows=on_rows, pace=pace)
            results.append(r)
            rtt = f"{np.median(r.rtt_ms):.1f} ms" if r.rtt_ms else "n/a"
            lost = f"  SERVER LOST {r.offline_s:.1f} s (held)" if r.offline_s > 0 else ""
            print(f"episode {i + 1}/{cfg.episodes}: {'success' if r.success else 'failure'}  steps {r.steps} "
                  f"(robot {r.robot_steps})  rows {r.rows}  robot held {r.robot_held}  overruns {r.overruns}  "
                  f"chunks {r.chunks}  held {r.held} ({r.held / driver.spec.control_hz:.1f} s)  rtt p50 {rtt}  "
                  f"{r.duration_s:.1f} s{lost}", flush=True)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        if outbox is not None:
            _drain(client, outbox, cfg.outbox_drain_s)
        client.close()
        if video is not None:
            print(f"video of the first {cfg.video_episodes} episode(s): {video.close()}")
        if view is not None:
            view.close()
        driver.close()
    n_ok = sum(r.success for r in results)
    pct = 100.0 * n_ok / max(1, len(results))
    print(f"success {n_ok}/{len(results)} ({pct:.1f}%)  requests {executor.stats.requests}  timeouts "
          f"{executor.stats.timeouts}  stale actions dropped {executor.stats.dropped_stale}  "
          f"safety: held {driver.stats.held}, rejected {driver.stats.rejected}, trips {driver.stats.trips}")
    lost_eps = sum(r.offline_s > 0 for r in results)
    if lost_eps:
        print(f"server lost {client.stats.lost} time(s): {lost_eps}/{len(results)} episode(s) ran partly or wholly "
              f"without it, {sum(r.offline_s for r in results):.1f} s held in all (their outcome is the hold's, "
              "not the policy's)")
    if pace is not None:
        print(f"paced to the learner: {pace.blocks} blocks of {pace.every} steps, waited {pace.wait_s:.1f} s, "
              f"{pace.timeouts} timeouts")
    return 0


def _client_curve(cfg: DriveConfig) -> Any:
    """CURVE keys for the driver port (None: keyless, as on loopback)."""
    if not cfg.curve_secret_key:
        return None
    if not cfg.curve_server_key:
        raise ValueError("curve_secret_key needs curve_server_key (the server's public key file)")
    from qc_robot.server.learner_link import CurveKeys  # zmq.auth only; torch-free

    return CurveKeys.from_files(cfg.curve_secret_key, cfg.curve_server_key)
