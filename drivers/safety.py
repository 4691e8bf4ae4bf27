"""The safety layer that wraps every driver (on by default).

Per control tick the loop hands it the policy's action for this step, or None when it has no
fresh one. The layer then:

* rejects NaN/inf or wrongly shaped actions (treated as "no fresh action");
* clips to the driver's action limits and to ``max_delta`` change per step (for drivers with
  ``absolute_actions`` also the first command after a reset, measured from the hold pose);
* holds (sends the driver's hold action) whenever there is no fresh action, including at
  start-up until the first valid action arrives, so a robot that connects before the policy
  is ready waits instead of tripping;
* holds while a sensor cannot give a current reading (``get_observation`` raised
  :class:`~qc_robot.drivers.base.SensorError`: a stale or failed camera): the loop gets the last
  good observation flagged by ``sensor_fault`` (never a silent repeat) and every action is
  replaced by the hold until a current reading arrives;
* trips the watchdog once actions have been flowing and none arrived for ``watchdog_s``:
  ``on_timeout='hold'`` keeps holding and resumes with the next fresh action, ``'stop'`` calls
  the driver's ``stop()`` and ignores actions until ``rearm()`` (an operator decision);
* ends the episode (``step_info().truncated``, and ``end_reason`` says why) on a latched stop and
  when the driver's budget of consecutive failed hardware accesses is spent
  (:class:`~qc_robot.drivers.base.IOBudgetSpent`; the arm is parked); ``reset`` clears both.

``last_held`` says whether the latest tick applied the hold instead of a fresh action (the
``held`` flag of that tick's row). ``close`` never raises: the error that ended a run must not be
hidden by a second one from a dead bus; a failure to close is logged instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.drivers.base import (
    Driver,
    DriverSpec,
    ExecutedStep,
    IOBudgetSpent,
    SensorError,
    StepInfo,
)

log = logging.getLogger("qc_robot.safety")


@dataclass
class SafetyConfig:
    """Safety limits applied on the robot side, whatever the server sends."""

    enabled: bool = True
    """False keeps only the driver's own limit clipping (never recommended on hardware)."""
    max_delta: list[float] = field(default_factory=list)
    """Largest change of the command per step: [] = off, one value for all dims, or one per dim."""
    watchdog_s: float = 0.5
    """No fresh action for this long (after the first one) trips the watchdog."""
    on_timeout: str = "hold"
    """'hold' (keep sending the hold action, resume on the next fresh one) or 'stop' (latched)."""


@dataclass
class SafetyStats:
    fresh: int = 0
    held: int = 0
    rejected: int = 0
    clipped: int = 0
    delta_limited: int = 0
    trips: int = 0
    sensor_faults: int = 0
    """Observations a sensor could not give current (stale or failed camera)."""
    sensor_holds: int = 0
    """Ticks held because of a sensor fault (also counted in ``held``)."""


class SafeDriver:
    """A driver behind the safety layer; offers the driver API plus ``act(action | None)``."""

    def __init__(self, driver: Driver, cfg: SafetyConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.driver, self.cfg, self.clock = driver, cfg or SafetyConfig(), clock
        if self.cfg.on_timeout not in ("hold", "stop"):
            raise ValueError(f"on_timeout must be 'hold' or 'stop', got {self.cfg.on_timeout!r}")
        a = driver.spec.action_dim
        md = np.asarray(self.cfg.max_delta, np.float32)
        if md.size not in (0, 1, a) or np.any(md <= 0):
            raise ValueError(f"max_delta needs 0, 1 or {a} positive values, got {self.cfg.max_delta}")
        self._max_delta = None if md.size == 0 else np.broadcast_to(md, (a,)).copy()
        self.stats = SafetyStats()
        self.sensor_fault: str | None = None
        """Why the last observation is not current (None: it is); actions are held meanwhile."""
        self._last_obs: dict[str, np.ndarray] | None = None
        self.last_held = False
        """The latest tick applied the hold (no fresh action, a sensor fault, a latched stop)."""
        self.rearm()

    # -- the driver API, delegated -------------------------------------------------------------
    @property
    def spec(self) -> DriverSpec:
        return self.driver.spec

    @property
    def realtime(self) -> bool:
        return self.driver.realtime

    @property
    def name(self) -> str:
        return self.driver.name

    @property
    def reports_reward(self) -> bool:
        return self.driver.reports_reward

    def connect(self) -> None:
        self.driver.connect()

    def close(self) -> None:
        """The driver's close (which parks and releases the arm); never raises (logged instead)."""
        try:
            self.driver.close()
        except Exception:  # noqa: BLE001 - must not replace the error that ended the run
            log.exception("closing %s failed", self.driver.name)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self.rearm()
        self.sensor_fault, self._last_obs, self.last_held = None, None, False
        obs = self.driver.reset(seed)
        self._last_obs = obs
        return obs

    def get_observation(self) -> dict[str, np.ndarray]:
        """The driver's observation; on a SensorError the last good one, with ``sensor_fault``
        set (the robot is held until a current reading arrives). Raises when there is none."""
        try:
            obs = self.driver.get_observation()
        except SensorError as e:
            if isinstance(e, IOBudgetSpent):
                self._end(str(e), park=True)
            self.stats.sensor_faults += 1
            if self.sensor_fault is None:
                log.warning("sensor fault: %s: holding the robot", e)
            self.sensor_fault = str(e)
            if self._last_obs is None:
                raise
            return {k: v.copy() for k, v in self._last_obs.items()}
        if self.sensor_fault is not None:
            log.info("sensors current again after: %s", self.sensor_fault)
        self.sensor_fault, self._last_obs = None, obs
        return obs

    def step_info(self) -> StepInfo:
        """The driver's; ``truncated`` while the episode is ended here (latched stop, I/O budget)."""
        info = self.driver.step_info()
        if self.end_reason is not None and not (info.terminated or info.truncated):
            info = dataclasses.replace(info, truncated=True)
        return info

    def executed_steps(self) -> list[ExecutedStep] | None:
        return self.driver.executed_steps()

    def wait_step(self, step: int, timeout_s: float) -> bool:
        return self.driver.wait_step(step, timeout_s)

    @property
    def logs_steps(self) -> bool:
        return self.driver.logs_steps

    def send_action(self, action: Any) -> np.ndarray:
        return self.act(action)

    def __enter__(self) -> SafeDriver:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- safety --------------------------------------------------------------------------------
    @property
    def tripped(self) -> bool:
        return self._tripped

    @property
    def waiting_for_first_action(self) -> bool:
        return self._last_fresh is None

    def rearm(self) -> None:
        """Back to start-up state: hold until the first valid action; clears a latched stop."""
        self._last_fresh: float | None = None
        self._last_cmd: np.ndarray | None = None
        self._tripped = False
        self.end_reason: str | None = None
        """Why this episode was ended here (None: it was not): a latched watchdog stop or a spent
        I/O budget. The control loop sees ``step_info().truncated``."""

    def _end(self, reason: str, park: bool) -> None:
        """End the episode here: nothing more reaches the robot until ``reset``."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        log.error("episode ended: %s", reason)
        try:
            self.driver.park() if park else self.driver.stop()
        except Exception as e:  # noqa: BLE001 - the bus may be what failed: the episode ends anyway
            log.error("%s of %s failed: %s", "park" if park else "stop", self.driver.name, e)

    def act(self, action: Any | None) -> np.ndarray:
        """One control tick: apply ``action`` (or a hold) through the limits; returns what was applied."""
        now = self.clock()
        a = self._validate(action)
        if self.sensor_fault is not None:
            self.stats.sensor_holds += 1
            a = None  # an action chosen without current sensors never reaches the robot
        self.last_held = a is None or self.end_reason is not None
        if self.end_reason is not None:
            return self.driver.hold_action()  # latched / ended: nothing reaches the robot until reset
        if a is None:
            if self._last_fresh is not None and not self._tripped and now - self._last_fresh > self.cfg.watchdog_s:
                self._trip(now)
                if self.end_reason is not None:
                    return self.driver.hold_action()
            self.stats.held += 1
            return self._command(self.driver.hold_action())
        self._last_fresh = now
        if self._tripped:
            log.info("fresh actions again: watchdog cleared")
            self._tripped = False
        self.stats.fresh += 1
        return self._command(a)

    def _validate(self, action: Any | None) -> np.ndarray | None:
        if action is None:
            return None
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (self.spec.action_dim,) or not np.all(np.isfinite(a)):
            self.stats.rejected += 1
            log.warning("rejected action %s (shape %s): holding instead", np.array2string(a, precision=3), a.shape)
            return None
        return a

    def _command(self, a: np.ndarray) -> np.ndarray:
        try:
            return self._limited(a)
        except IOBudgetSpent as e:  # commands kept failing: end the episode, park the arm
            self.last_held = True
            self._end(str(e), park=True)
            return self.driver.hold_action()

    def _limited(self, a: np.ndarray) -> np.ndarray:
        if not self.cfg.enabled:
            applied = self.driver.send_action(a)
            self._last_cmd = applied
            return applied
        lim = np.clip(a, self.spec.action_low, self.spec.action_high)
        if np.any(lim != a):
            self.stats.clipped += 1
        ref = self._last_cmd
        if ref is None and getattr(self.driver, "absolute_actions", False):
            ref = self.driver.hold_action()  # a pose target: the first one must not jump either
        if self._max_delta is not None and ref is not None:
            limited = np.clip(lim, ref - self._max_delta, ref + self._max_delta)
            if np.any(limited != lim):
                self.stats.delta_limited += 1
            lim = limited
        applied = self.driver.send_action(lim)
        self._last_cmd = applied
        return applied

    def _trip(self, now: float) -> None:
        self.stats.trips += 1
        self._tripped = True
        waited = now - self._last_fresh if self._last_fresh is not None else 0.0
        if self.cfg.on_timeout == "stop":
            log.error("watchdog: no fresh action for %.3f s: stopping the robot (rearm to resume)", waited)
            self._end(f"watchdog stop: no fresh action for {waited:.3f} s", park=False)
        else:
            log.warning("watchdog: no fresh action for %.3f s: holding", waited)
