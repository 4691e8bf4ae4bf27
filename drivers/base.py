"""The driver API: what every robot (real, simulated or mock) offers the control loop.

Modelled on LeRobot's ``Robot``: a driver declares its observation and action spec, and
``send_action`` returns the action actually applied after clipping. Drivers are wrapped in
``drivers.safety.SafeDriver`` by the registry, so the limits below are the last line of defence,
not the only one. numpy only: a robot PC needs neither torch nor mujoco to import this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.base import ObsField
from qc_robot.protocol import Hello, obs_spec_to_wire


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
    extra: dict[str, Any] = field(default_factory=dict)


class Driver(ABC):
    """Base class. Subclasses implement ``_apply`` and the observation/reset methods.

    ``realtime`` says who owns time: a realtime driver's world moves on its own clock (hardware,
    the wall-clock sim), so the control loop must keep commanding it; a lockstep driver advances
    exactly one control step per ``send_action`` (mock, the lockstep sim).
    """

    name: str = "driver"
    spec: DriverSpec
    realtime: bool = False

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
        return a

    def hold_action(self) -> np.ndarray:
        """The command that keeps the robot where it is. Zeros (inside the limits) suit delta and
        velocity control; position-controlled drivers override it with the current position."""
        return np.clip(np.zeros(self.spec.action_dim, np.float32), self.spec.action_low, self.spec.action_high)

    def stop(self) -> None:
        """Bring the robot to a safe stop (hardware: brakes/torque off). Default: one hold command."""
        self._apply(self.hold_action())

    def step_info(self) -> StepInfo:
        """Reward/success/done of the latest step; drivers without a task return defaults."""
        return StepInfo()

    def __enter__(self) -> Driver:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
