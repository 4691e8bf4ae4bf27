"""The driver API: what every robot (real, simulated or mock) offers the control loop.

Modelled on LeRobot's ``Robot``: a driver declares its observation and action spec, and
``send_action`` returns the action actually applied after clipping. Drivers are wrapped in
``qc_robot.drivers.safety.SafeDriver`` by the registry, so the limits below are the last line of defence,
not the only one. numpy only: a robot PC needs neither torch nor mujoco to import this.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.policies.base import ObsField
from qc_robot.protocol import Hello, obs_spec_to_wire

log = logging.getLogger("qc_robot.driver")


class SensorError(RuntimeError):
    """A sensor cannot give a current reading (a stale or failed camera, a failed bus read).
    Raised by ``get_observation``; the safety layer holds the robot until readings are current
    again, and flags the held ticks."""


class IOBudgetSpent(SensorError):
    """More consecutive hardware accesses failed than the driver's ``max_io_errors`` allows: the
    safety layer ends the episode (truncated) and parks the arm; the run goes on if the next
    ``reset`` reaches the robot again."""


ARM_EPISODE_S = 30.0
"""A real arm's default episode length: long enough for a tabletop pick-and-place, short enough
that an arm left alone stops, parks and resets (at 20 Hz, 600 steps)."""


def arm_episode_steps(max_episode_steps: int, control_hz: float) -> int:
    """A real arm's episode limit in steps: ``max_episode_steps`` if positive, 0 (the default)
    :data:`ARM_EPISODE_S` of control ticks, negative none at all."""
    if max_episode_steps > 0:
        return max_episode_steps
    return 0 if max_episode_steps < 0 else int(round(ARM_EPISODE_S * control_hz))


@dataclass
class DriverSpec:
    """What a driver observes and accepts."""

    obs_fields: list[ObsField]
    action_dim: int
    action_low: np.ndarray
    """(A,) float32 lowest command the hardware accepts."""
    action_high: np.ndarray
    control_hz: float
    max_episode_steps: int = 0
    """0: no limit of the driver's own."""

    def __post_init__(self) -> None:
        self.action_low = np.asarray(self.action_low, np.float32).reshape(self.action_dim)
        self.action_high = np.asarray(self.action_high, np.float32).reshape(self.action_dim)
        if not np.all(self.action_low <= self.action_high):
            raise ValueError("action_low must be <= action_high")

    def hello(self, driver: str, meta: dict[str, Any] | None = None) -> Hello:
        """The handshake message announcing this spec."""
        return Hello(driver=driver, obs_spec=obs_spec_to_wire(self.obs_fields), action_dim=self.action_dim,
                     action_low=self.action_low, action_high=self.action_high,
                     control_hz=float(self.control_hz), meta=dict(meta or {}))


@dataclass
class StepInfo:
    """Outcome of the most recent control step (drivers without a task report defaults)."""

    reward: float = 0.0
    success: bool = False
    terminated: bool = False
    """True termination (the task ended), as the env/task defines it."""
    truncated: bool = False
    """Time limit or an operator stop."""
    step: int = 0
    """Control steps the robot executed since reset (its own clock)."""
    time: float = 0.0
    """``time.monotonic()`` when this step's result was published (0: unknown / before any step)."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecutedStep:
    """One control step exactly as the robot executed it: a realtime driver's own record.

    A realtime robot's world moves on its own clock, so the control loop cannot tell by itself
    which command a tick applied or whether the world moved between two of its reads; the robot's
    controller can. ``obs`` → ``action`` → ``next_obs`` is the Markov transition of that tick.
    """

    step: int
    """0-based index of this step since reset (``next_obs`` is the state after ``step + 1`` steps)."""
    obs: dict[str, np.ndarray]
    """The observation the robot published before this step: what a command sent in time saw."""
    action: np.ndarray
    """(A,) the command applied at this step (already clamped; the hold action when ``held``)."""
    held: bool
    """No new command had arrived by this tick: the controller applied its hold action."""
    reward: float
    success: bool
    terminated: bool
    truncated: bool
    next_obs: dict[str, np.ndarray]
    t: float
    """``time.monotonic()`` when the step was applied."""
    wall_time: float
    """``time.time()`` when the step was applied (comparable across machines)."""
    late_s: float = 0.0
    """How late the tick started against its schedule."""
    cmd_step: int = -1
    """Steps the robot had executed when the applied command was sent (-1: a hold). The command
    was computed from an observation no newer than that step's; ``step - cmd_step`` is the delay."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Driver-specific per-step data (the sim: ``state``, MuJoCo qpos|qvel before the step)."""
    intervention: bool = False
    """The operator had the controls at this step (set by the control loop, not the driver)."""
    policy_version: str = ""
    """Version of the policy whose chunk gave the applied command ('' = none: a hold or the operator)."""


class Driver(ABC):
    """Base class. Subclasses implement ``_apply`` and the observation/reset methods.

    ``realtime`` says who owns time: a realtime driver's world moves on its own clock (hardware,
    the wall-clock sim), so the control loop must keep commanding it; a lockstep driver advances
    exactly one control step per ``send_action`` (mock, the lockstep sim).
    """

    name: str = "driver"
    spec: DriverSpec
    realtime: bool = False
    reports_reward: bool = False
    """True: ``step_info`` gives the task's own reward and success (a simulator, the mock). A real
    arm knows neither: with an operator in the loop its rewards come from the verdicts."""
    absolute_actions: bool = False
    """True: an action is a target pose and the hold is the current target (position control), so
    the safety layer's ``max_delta`` also bounds the first command after a reset, from the hold."""

    def connect(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Open the hardware / build the simulator. Idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the hardware. Idempotent."""

    @abstractmethod
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode; returns its first observation."""

    @abstractmethod
    def get_observation(self) -> dict[str, np.ndarray]:
        """The most recent observation (never blocks for long: no I/O waits in the loop)."""

    @abstractmethod
    def _apply(self, action: np.ndarray) -> None:
        """Command the hardware with an action already checked against the limits."""

    def send_action(self, action: Any) -> np.ndarray:
        """Clip ``action`` to the limits, apply it, return what was applied.

        Raises ValueError on a wrong shape or NaN/inf (the safety layer turns those into holds).
        """
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (self.spec.action_dim,):
            raise ValueError(f"action must have shape ({self.spec.action_dim},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("action contains NaN/inf")
        a = np.clip(a, self.spec.action_low, self.spec.action_high)
        self._apply(a)
        self._commanded(a)
        return a

    def _commanded(self, action: np.ndarray) -> None:
        """``action`` was sent: the hold's kept dimensions repeat it. A driver that applies commands
        later (a latency, its own clock) records them as it executes them instead."""
        self._last_command = action

    hold_keeps: tuple[int, ...] = ()
    """Action dimensions the hold repeats from the last command instead of zeroing: a command the
    robot needs *kept* to stay as it is, such as the OGBench sim's gripper (a zero gripper command
    there means "stop squeezing": a held cube would be let go)."""
    _last_command: np.ndarray | None = None

    def hold_action(self) -> np.ndarray:
        """The command that keeps the robot where it is, its grasp included. Zeros (inside the
        limits) suit delta and velocity control, with the ``hold_keeps`` dimensions of the last
        command; position-controlled drivers override it with the current position."""
        a = np.zeros(self.spec.action_dim, np.float32)
        if self.hold_keeps and self._last_command is not None:
            keep = list(self.hold_keeps)
            a[keep] = self._last_command[keep]
        return np.clip(a, self.spec.action_low, self.spec.action_high)

    def _forget_command(self) -> None:
        """A new episode: the hold repeats nothing of the last one."""
        self._last_command = None

    def stop(self) -> None:
        """Bring the robot to a safe stop where it is (never by reading the hardware first: a
        stop must work on a failing bus). Default: one hold command."""
        self._apply(self.hold_action())

    def park(self) -> None:
        """Bring the robot to rest before it is released (an episode ended by a fault, ``close``).
        Default: ``stop``; arms with a rest pose move there."""
        self.stop()

    # -- one I/O-error budget and one step counter for every hardware driver ----------------------
    max_io_errors: int = 5
    """Consecutive failed hardware accesses of one kind (reads, or commands) tolerated (a failed
    read raises SensorError: a hold) before :class:`IOBudgetSpent` ends the episode."""
    io_errors_total: int = 0
    """Failed accesses since the driver was built."""
    _io_run: dict[str, int] = {}  # noqa: RUF012 - replaced per instance on first use

    @property
    def io_errors(self) -> int:
        """Consecutive failed accesses now, of the kind failing longest (a success of a kind resets
        that kind only: commands that go through do not hide reads that keep failing)."""
        return max(self._io_run.values(), default=0)

    def _io_clear(self) -> None:
        """A fresh start (reset): no failure counts against the new episode."""
        self._io_run = {}

    def _io_ok(self, what: str = "read") -> None:
        if self._io_run.get(what):
            self._io_run = {**self._io_run, what: 0}

    def _io_failed(self, what: str, e: BaseException) -> SensorError:
        """Count a failed ``what`` (read, write, command); returns the error to raise: a
        SensorError (hold this tick) or, past the budget, IOBudgetSpent (end the episode)."""
        n = self._io_run.get(what, 0) + 1
        self._io_run = {**self._io_run, what: n}
        self.io_errors_total += 1
        log.warning("%s: %s failed (%d in a row): %s", self.name, what, n, e)
        if n > self.max_io_errors:
            return IOBudgetSpent(f"{self.name}: {n} consecutive failed {what}s "
                                 f"(max_io_errors={self.max_io_errors}); last: {e}")
        return SensorError(f"{self.name}: {what} failed: {e}")

    def _count_step(self, limit: int, **outcome: Any) -> StepInfo:
        """Publish the outcome of one executed step: the step counter advances by one and the
        episode is truncated at ``limit`` steps (0: no limit) unless it terminated."""
        step = self._step_info().step + 1
        terminated = bool(outcome.pop("terminated", False))
        truncated = bool(outcome.pop("truncated", False)) or bool(limit and step >= limit and not terminated)
        self._info = StepInfo(step=step, terminated=terminated, truncated=truncated, time=time.monotonic(), **outcome)
        return self._info

    def _reset_steps(self) -> None:
        self._info = StepInfo()

    def _step_info(self) -> StepInfo:
        return getattr(self, "_info", None) or StepInfo()

    def step_info(self) -> StepInfo:
        """Reward/success/done of the latest step (what ``_count_step`` published; defaults
        before the first step)."""
        return self._step_info()

    def executed_steps(self) -> list[ExecutedStep] | None:
        """The steps executed since the last call, oldest first (realtime drivers that log their
        own ticks). None: this driver keeps no such log; the control loop then composes each row
        from its own reads, which is exact for a lockstep driver."""
        return None

    @property
    def logs_steps(self) -> bool:
        """True when ``executed_steps`` returns the robot's own record of every step."""
        return False

    def wait_step(self, step: int, timeout_s: float) -> bool:
        """Block until the robot has executed at least ``step`` steps since reset, or ``timeout_s``
        passed; True if it has. Lockstep drivers have always done so when ``send_action`` returns."""
        return True

    def __enter__(self) -> Driver:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
