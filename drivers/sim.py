"""A MuJoCo (OGBench) robot that behaves like hardware.

Realtime mode (default): the simulated robot runs its own controller thread that ticks at the
control rate in wall-clock time (``time_scale`` speeds the clock up for tests). Each tick it
applies the newest command that has *arrived* (sent ``latency_ms`` earlier) or, if none arrived
since the previous tick, the hold action, like a robot controller with a one-tick watchdog. The
world keeps moving while the policy thinks, so inference delay has its real cost.

Lockstep mode (``realtime=False``): each ``send_action`` advances exactly one control step, with
latency expressed as whole steps of delay; deterministic for a seed (conformance tests, evals).

Every realtime tick is logged as an :class:`~qc_robot.drivers.base.ExecutedStep` (observation before,
command applied, held or not, reward and flags, observation after, timestamps): the exact
transitions the control loop streams and calibration replays. A realtime observation is one
sensor reading per tick (noise drawn once per tick), so every read between two ticks agrees with
the logged row.

Calibration (``calibration/<robot_id>.json``, optional): its identified physical parameters are
applied to the MuJoCo model, its control delay and observation noise are used where the config
leaves ``latency_ms``/``obs_noise`` at 0, and with ``randomize`` every episode draws the parameters
from the file's ranges (domain randomization for training and robustness evals).

Camera images (``image_size`` > 0, and by default on OGBench's visual-* tasks): each step also
renders the task camera into ``{image_key: uint8 (S, S, 3)}`` beside the state, after the physics
and before the step is published, so a logged row's image and state describe the same instant.
Rendering runs on the camera's own GL thread and its cost (35-700 ms a frame on this CPU) is
part of the tick: a realtime sim with images cannot hold 20 Hz here (``overruns`` counts it).

Only the gymnasium API of ``qc_robot.sim.tasks.make_env`` (plus ``env.unwrapped.model`` for calibration)
is used; mujoco/ogbench are imported when the driver connects, so ``import qc_robot.drivers.sim`` stays cheap.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qc_robot.drivers.base import Driver, DriverSpec, ExecutedStep, StepInfo
from qc_robot.policies.base import ObsField

log = logging.getLogger("qc_robot.sim")
LOG_STEPS = 100_000
"""Executed steps the realtime log keeps when nobody drains it (oldest dropped first)."""


@dataclass
class SimConfig:
    env: str = "cube-double-task2"
    """Task name from ``qc_robot.sim.tasks`` (e.g. cube-double-task2)."""
    sparse_reward: bool | None = None
    """None: the task's paper default."""
    max_episode_steps: int = 0
    """0: the task's own limit."""
    realtime: bool = True
    time_scale: float = 1.0
    """Wall-clock speed-up of the realtime controller (1 = real time)."""
    latency_ms: float = 0.0
    """Actuation latency: a command takes effect this long after ``send_action``."""
    obs_noise: float = 0.0
    """Std of Gaussian noise added to every observation read (sensor noise)."""
    seed: int = 0
    obs_key: str = "state"
    calibration: str = ""
    """Path of a calibration file ('' = the stock model): physics applied, delay and noise defaulted."""
    randomize: bool = False
    """Draw the physical parameters per episode from the calibration's ranges."""
    image_size: int = -1
    """Side of the square camera image in every observation (-1: the task's default, 64 on the
    visual-* tasks and none otherwise; 0: none)."""
    image_key: str = "image"
    """Observation key of the image (uint8 (image_size, image_size, 3) RGB)."""
    camera: str = "front_pixels"
    """MuJoCo camera the image is rendered from."""
    render_fast: bool = False
    """Cheaper rendering (512² shadow map, no MSAA) instead of OGBench's exact settings."""
    blind: bool = False
    """Behave like a real arm, which knows no reward: the loop, its transitions and logs get
    reward 0, no success and no termination at the goal (the episode runs until an operator's
    verdict or the time limit). The true outcome stays readable through ``hidden_info`` for the
    scripted operator alone."""
    hold_keeps: list[int] | None = None
    """The hold (a tick with no fresh command): zero motion, and these action dimensions repeated
    from the last command. None: the gripper's (the last dimension). OGBench's gripper command is
    relative to the fingers' current opening, so a zero there stops the squeeze and a grasped cube
    is let go; repeating the last one keeps the grasp."""


class SimDriver(Driver):
    """OGBench task as a robot: observation ``{obs_key: (obs_dim,) float64}`` (plus
    ``{image_key: (S, S, 3) uint8}`` with a camera), actions in [-1, 1]."""

    name = "sim"

    def __init__(self, cfg: SimConfig | None = None) -> None:
        from qc_robot.sim.tasks import task_spec  # static table, no simulator import

        self.cfg = cfg = cfg or SimConfig()
        if cfg.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.task = task_spec(cfg.env)
        limit = cfg.max_episode_steps or self.task.max_episode_steps
        a = self.task.act_dim
        self.image_size = self.task.default_image_size if cfg.image_size < 0 else cfg.image_size
        fields = [ObsField(cfg.obs_key, (self.task.obs_dim,), "float64")]
        if self.image_size > 0:
            if cfg.image_key == cfg.obs_key:
                raise ValueError(f"image_key and obs_key are both {cfg.obs_key!r}")
            fields.append(ObsField(cfg.image_key, (self.image_size, self.image_size, 3), "uint8"))
        self.spec = DriverSpec(fields, a, -np.ones(a), np.ones(a), self.task.control_hz, limit)
        keeps = [a - 1] if cfg.hold_keeps is None else [int(i) for i in cfg.hold_keeps]
        if any(not 0 <= i < a for i in keeps):
            raise ValueError(f"hold_keeps {keeps}: action dimensions are 0..{a - 1}")
        self.hold_keeps = tuple(keeps)
        self.realtime = cfg.realtime
        self._period = 1.0 / (self.task.control_hz * cfg.time_scale)  # wall seconds per tick
        self.calibration: Any = None
        self.calibration_id = ""
        """Id of the calibration in use (recorded with every logged episode); '' = none."""
        latency_ms, self._obs_noise = cfg.latency_ms, cfg.obs_noise
        if cfg.calibration:
            from qc_robot.calibration.files import load_calibration  # stdlib + numpy only

            self.calibration = load_calibration(cfg.calibration, task=cfg.env)
            self.calibration_id = self.calibration.id
            if latency_ms <= 0:  # an explicit latency in the config wins over the calibration's
                latency_ms = self.calibration.control_delay_steps * 1e3 / self.task.control_hz
            if self._obs_noise <= 0:
                self._obs_noise = self.calibration.obs_noise
        if cfg.randomize and (self.calibration is None or not (self.calibration.physics or {}).get("ranges")):
            raise ValueError("randomize needs a calibration file with physics ranges")
        self.latency_ms = latency_ms
        self._latency_s = latency_ms / 1e3 / cfg.time_scale
        self._latency_steps = int(round(latency_ms / 1e3 * self.task.control_hz))
        self._physics: Any = None  # qc_robot.calibration.randomization.PhysicsParams once connected
        self._phys_rng = np.random.default_rng(cfg.seed + 2)
        self._env: Any = None
        self._lock = threading.Lock()  # guards obs and info between the tick thread and readers
        self._ticked = threading.Condition(self._lock)  # notified when a realtime tick is published
        self._inbox: collections.deque[tuple[float, np.ndarray, int]] = collections.deque()  # (due, cmd, step)
        self._log: collections.deque[ExecutedStep] = collections.deque(maxlen=LOG_STEPS)
        self._reading = np.zeros(self.task.obs_dim)  # realtime: this tick's (noisy) sensor reading
        self._pipe: collections.deque[np.ndarray] = collections.deque()  # lockstep latency FIFO
        self._obs = np.zeros(self.task.obs_dim)
        self._frame = np.zeros((max(self.image_size, 0),) * 2 + (3,), np.uint8)  # latest render
        self._frame_reading = self._frame  # realtime: the frame published with this tick's reading
        self._info = self._hidden = StepInfo()
        self._noise_rng = np.random.default_rng(cfg.seed + 1)
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self.missed_ticks = 0
        """Realtime ticks that found no new command (hold applied)."""
        self.overruns = 0
        """Realtime ticks that started more than a period late."""
        self.log_dropped = 0
        """Executed-step records overwritten before anyone read them (nobody drains the log)."""

    def connect(self) -> None:
        if self._env is None:
            from qc_robot.sim.tasks import make_env

            self._env = make_env(self.cfg.env, sparse_reward=self.cfg.sparse_reward,
                                 max_episode_steps=self.spec.max_episode_steps, seed=self.cfg.seed,
                                 image_size=self.image_size, camera=self.cfg.camera,
                                 render_fast=self.cfg.render_fast)
            if self.calibration is not None and self.calibration.physics:
                from qc_robot.calibration.randomization import PhysicsParams

                self._env.reset(seed=self.cfg.seed)  # OGBench compiles the MjModel on the first reset
                self._physics = PhysicsParams(self._env)
                self._physics.apply(self.calibration.physics["params"])

    @property
    def reports_reward(self) -> bool:  # type: ignore[override]
        return not self.cfg.blind

    @property
    def physics_params(self) -> dict[str, float]:
        """Physical parameters applied to the model now (the stock model's if uncalibrated)."""
        from qc_robot.calibration.randomization import nominal_params

        return dict(self._physics.current) if self._physics is not None else nominal_params()

    @property
    def env(self) -> Any:
        """The simulated task's gymnasium env (None before ``connect``), for tools that read the
        simulator itself, such as the scripted teleop operator. Not part of the Driver API."""
        return self._env

    def sim_state(self) -> np.ndarray:
        """MuJoCo qpos|qvel of the current state (robomimic ``states``; for system identification)."""
        with self._lock:
            d = self._env.unwrapped.data
            return np.concatenate([d.qpos, d.qvel])

    def close(self) -> None:
        self._stop_clock()
        if self._env is not None:
            self._env.close()
            self._env = None

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self.connect()
        self._stop_clock()
        if seed is not None:
            self._phys_rng = np.random.default_rng(seed + 2)
        if self.cfg.randomize and self._physics is not None:
            from qc_robot.calibration.randomization import sample_params

            phys = self.calibration.physics
            self._physics.apply(sample_params(phys["ranges"], self._phys_rng, phys["params"]))
        self._forget_command()
        with self._lock:
            obs, _ = self._env.reset(seed=seed)
            if self.image_size > 0:
                self._frame = self._frame_reading = self._env.image()
            self._obs = np.asarray(obs, np.float64)
            self._info = self._hidden = StepInfo(time=time.monotonic())
            self._inbox.clear()
            self._pipe.clear()
            self._log.clear()
            if seed is not None:
                self._noise_rng = np.random.default_rng(seed + 1)
            if self.realtime:
                self._reading = self._noisy(self._obs)
        if self.realtime:
            self._running.set()
            self._thread = threading.Thread(target=self._clock, name="sim-robot", daemon=True)
            self._thread.start()
        return self.get_observation()

    def get_observation(self) -> dict[str, np.ndarray]:
        if self.realtime:
            with self._lock:
                return self._obs_dict(self._reading.copy(), self._frame_reading)
        with self._lock:
            obs, frame = self._obs.copy(), self._frame
        return self._obs_dict(self._noisy(obs), frame)

    def _obs_dict(self, state: np.ndarray, frame: np.ndarray) -> dict[str, np.ndarray]:
        """The observation map: the state, and the image when there is a camera (a copy: callers
        may keep it while the next frame is rendered)."""
        out = {self.cfg.obs_key: state}
        if self.image_size > 0:
            out[self.cfg.image_key] = frame.copy()
        return out

    def step_info(self) -> StepInfo:
        with self._lock:
            return self._info

    def hidden_info(self) -> StepInfo:
        """The true outcome of the latest step, also when ``blind`` (the scripted operator's oracle
        of success; nothing on the robot's side of the loop reads it)."""
        with self._lock:
            return self._hidden

    def executed_steps(self) -> list[ExecutedStep] | None:
        """Realtime: the ticks executed since the last call. Lockstep: None (the loop's rows are exact)."""
        if not self.realtime:
            return None
        with self._lock:
            out = list(self._log)
            self._log.clear()
        return out

    @property
    def logs_steps(self) -> bool:
        return self.realtime

    def wait_step(self, step: int, timeout_s: float) -> bool:
        if not self.realtime:
            return True
        with self._ticked:
            return self._ticked.wait_for(lambda: self._info.step >= step or self._ended(), max(0.0, timeout_s)) \
                and self._info.step >= step

    def _ended(self) -> bool:
        return self._info.terminated or self._info.truncated or not self._running.is_set()

    def _apply(self, action: np.ndarray) -> None:
        if self._env is None:
            raise RuntimeError("sim driver not connected")
        if self.realtime:
            self._inbox.append((time.monotonic() + self._latency_s, action.copy(), self._info.step))
            return
        self._pipe.append(action.copy())  # lockstep: the command takes effect k steps later
        cmd = self._pipe.popleft() if len(self._pipe) > self._latency_steps else self.hold_action()
        self._step(cmd)

    def _commanded(self, action: np.ndarray) -> None:
        pass  # recorded in ``_step``: the hold repeats what the robot executed, not what is in transit

    def stop(self) -> None:
        self._inbox.clear()  # pending commands are dropped; the controller holds from now on
        self._pipe.clear()

    # -- internals -----------------------------------------------------------------------------

    def _noisy(self, obs: np.ndarray) -> np.ndarray:
        if self._obs_noise > 0:
            return obs + self._noise_rng.normal(0.0, self._obs_noise, obs.shape)
        return obs.copy()

    def _step(self, cmd: np.ndarray) -> None:
        """One control step; a finished episode ignores further steps.

        Only one thread steps at a time (the tick thread, or the caller in lockstep), so the
        physics runs outside the lock and readers wait only for the assignment, not the step.
        """
        if self._info.terminated or self._info.truncated:
            return
        self._last_command = cmd
        obs, reward, terminated, truncated, info = self._env.step(cmd)
        frame = self._env.image() if self.image_size > 0 else self._frame
        hidden = StepInfo(float(reward), bool(info.get("success", False)), bool(terminated),
                          bool(truncated), self._info.step + 1, time.monotonic())
        # blind: the time limit is no secret, the outcome is (the world goes on past the goal)
        new_info = StepInfo(0.0, False, False, hidden.truncated, hidden.step, hidden.time) if self.cfg.blind \
            else hidden
        with self._lock:
            self._obs = np.asarray(obs, np.float64)
            self._frame = frame
            self._info, self._hidden = new_info, hidden

    def _tick(self, cmd: np.ndarray, held: bool, cmd_step: int, late_s: float) -> None:
        """One realtime step, logged: the reading before, the command, the reading after."""
        if self._info.terminated or self._info.truncated:
            return
        before, frame_before, state = self._reading, self._frame_reading, self.sim_state()
        t, wall = time.monotonic(), time.time()
        step = self._info.step
        self._step(cmd)
        # the actuator targets this tick's physics ran with (the IK's joint targets, the gripper's):
        # what a real arm's controller reports as its commanded joint positions
        ctrl = self._env.unwrapped.data.ctrl.copy()
        reading, frame = self._noisy(self._obs), self._frame
        info = self._info
        row = ExecutedStep(step, self._obs_dict(before, frame_before), cmd.astype(np.float32), held, info.reward,
                           info.success, info.terminated, info.truncated, self._obs_dict(reading, frame), t, wall,
                           late_s, cmd_step, {"state": state, "ctrl": ctrl})
        with self._ticked:
            self._reading, self._frame_reading = reading, frame
            if len(self._log) == self._log.maxlen:
                self.log_dropped += 1
            self._log.append(row)
            self._ticked.notify_all()

    def _clock(self) -> None:
        """The robot controller: tick at the control rate, apply the newest arrived command."""
        next_tick = time.monotonic() + self._period
        while self._running.is_set():
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            late = now - next_tick
            if late > self._period:
                self.overruns += 1
                next_tick = now  # do not try to catch up: a real controller would not either
            arrived: np.ndarray | None = None
            cmd_step = -1
            while self._inbox and self._inbox[0][0] <= now:
                _, arrived, cmd_step = self._inbox.popleft()
            held = arrived is None
            if arrived is None:
                self.missed_ticks += 1
            self._tick(self.hold_action() if arrived is None else arrived, held, cmd_step, max(0.0, late))
            if self._info.terminated or self._info.truncated:
                with self._ticked:
                    self._ticked.notify_all()
                return
            next_tick += self._period

    def _stop_clock(self) -> None:
        self._running.clear()
        with self._ticked:
            self._ticked.notify_all()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
