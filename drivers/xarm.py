"""A UFactory xArm (5/6/7, Lite 6, 850) through ``xarm-python-sdk`` as a qc-robot driver (``driver=xarm``).

Cartesian delta control in the OGBench layout: an action ``[dx, dy, dz, dyaw, gripper]`` in
[-1, 1] moves the tool target by up to ``step_mm`` / ``step_yaw_deg`` per control step and the
gripper target by up to ``gripper_step`` (+1 closes, -1 opens), with the tool pointing down
(``roll_deg``/``pitch_deg`` fixed). The hold command is all zeros: the target stays put.

Safety, in three layers: qc-robot's safety layer (limits, max_delta, watchdog) as for every
driver; here, every target is clamped into the workspace box and yaw range, and to one step
around the measured pose (a blocked arm's target does not run ahead), before it is sent; and the
same box is programmed into the controller's own safety boundary (``controller_fence``: the box,
the reduced TCP speed ``speed_mm_s``, fence mode, then reduced mode on, without which the SDK says
the boundary does not take effect), so even a command that bypassed this driver stops the arm
with controller error 35. Every setting changed at connect is restored at close. Targets are
streamed in mode 7 (the controller's online Cartesian planner, capped at ``speed_mm_s``); a
step that asks for more (``step_mm × control_hz > speed_mm_s``) is refused when the driver is
built. Controller errors are never cleared automatically: that is the operator's decision.

Faults: a failed read raises SensorError (the safety layer holds, the row is flagged held);
``max_io_errors`` consecutive failures end the episode. ``close`` stops, restores and disconnects,
and never raises.

Observation ``state`` (5,): tool x, y, z (m), yaw (rad) and the gripper's closing fraction (0 open,
1 closed), measured each tick. The SDK is imported when the driver connects (extra
``qc-robot[xarm]``); it needs no torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.drivers.base import Driver, DriverSpec, IOBudgetSpent, arm_episode_steps
from qc_robot.policies.base import ObsField

log = logging.getLogger("qc_robot.xarm")

GRIPPER_OPEN, GRIPPER_CLOSED = 850.0, 0.0  # xArm Gripper position units
NO_REPLY = 3  # the SDK's code for a request the box did not answer in time


@dataclass
class XArmConfig:
    ip: str = ""
    """Control box address (required), e.g. 192.168.1.203."""
    control_hz: float = 20.0
    """The rate policies are trained at here (the sim tasks' 20 Hz)."""
    max_episode_steps: int = 0
    """Steps before an episode is truncated; 0: 30 s of control ticks (600 at 20 Hz,
    ``base.ARM_EPISODE_S``), negative: no limit (episodes end only by the operator)."""
    step_mm: float = 5.0
    """Tool translation per step for a unit command (``step_mm × control_hz ≤ speed_mm_s``)."""
    step_yaw_deg: float = 5.0
    gripper_step: float = 0.25
    """Change of the gripper's closing fraction per step for a unit command. The hold (a tick with
    no fresh command) is all zeros: the tool target and the gripper's closing target both stay, so
    a grasp is kept."""
    workspace_low_mm: list[float] = field(default_factory=lambda: [250.0, -250.0, 80.0])
    """Lowest x, y, z of the tool target (base frame, mm)."""
    workspace_high_mm: list[float] = field(default_factory=lambda: [550.0, 250.0, 400.0])
    yaw_range_deg: list[float] = field(default_factory=lambda: [-90.0, 90.0])
    roll_deg: float = 180.0
    pitch_deg: float = 0.0
    home_mm: list[float] = field(default_factory=lambda: [400.0, 0.0, 300.0])
    """Where ``reset`` moves the tool (inside the workspace box)."""
    home_yaw_deg: float = 0.0
    speed_mm_s: float = 150.0
    """TCP speed cap of every move (mode 7 plans within it)."""
    acc_mm_s2: float = 2000.0
    reset_timeout_s: float = 30.0
    controller_fence: bool = True
    """Also program the workspace box as the controller's safety boundary (fence mode on)."""
    gripper: bool = True
    """An xArm Gripper on the tool flange (RS-485); False: the gripper action is ignored."""
    gripper_speed: float = 3000.0
    max_io_errors: int = 3
    """Consecutive failed SDK calls (each read a hold, each command skipped) before the episode ends."""
    sdk_args: dict[str, Any] = field(default_factory=dict)
    """Further ``XArmAPI`` keyword arguments."""
    obs_key: str = "state"


def _code(ret: Any) -> int:
    """The SDK returns a code, a (code, value) pair or a [code] list depending on the call."""
    if isinstance(ret, (list, tuple)):
        return int(ret[0])
    return int(ret)


class XArmDriver(Driver):
    """An xArm in Cartesian delta control, behind the workspace box and the controller's fence."""

    name = "xarm"
    realtime = True

    def __init__(self, cfg: XArmConfig | None = None, arm: Any = None) -> None:
        """``arm``: an already connected ``xarm.wrapper.XArmAPI`` (else built from ``cfg.ip``)."""
        self.cfg = cfg = cfg or XArmConfig()
        self._lo = np.asarray(cfg.workspace_low_mm, np.float64).reshape(3)
        self._hi = np.asarray(cfg.workspace_high_mm, np.float64).reshape(3)
        self._yaw_lo, self._yaw_hi = sorted(float(v) for v in cfg.yaw_range_deg)
        home = np.asarray(cfg.home_mm, np.float64).reshape(3)
        if np.any(self._lo >= self._hi) or np.any(home < self._lo) or np.any(home > self._hi):
            raise ValueError(f"workspace box {list(self._lo)}..{list(self._hi)} must be non-empty and hold home {list(home)}")
        if not self._yaw_lo <= cfg.home_yaw_deg <= self._yaw_hi:
            raise ValueError(f"home_yaw_deg {cfg.home_yaw_deg} outside yaw_range_deg {cfg.yaw_range_deg}")
        if cfg.step_mm * cfg.control_hz > cfg.speed_mm_s + 1e-9:
            raise ValueError(f"step_mm {cfg.step_mm:g} × control_hz {cfg.control_hz:g} = {cfg.step_mm * cfg.control_hz:g} mm/s "
                             f"exceeds speed_mm_s {cfg.speed_mm_s:g}: the target would run ahead of the arm; "
                             f"use step_mm ≤ {cfg.speed_mm_s / cfg.control_hz:g}")
        self.spec = DriverSpec([ObsField(cfg.obs_key, (5,), "float32")], 5, -np.ones(5), np.ones(5),
                               cfg.control_hz, arm_episode_steps(cfg.max_episode_steps, cfg.control_hz))
        self.arm = arm
        self._target = np.r_[home, cfg.home_yaw_deg]  # x, y, z (mm), yaw (deg)
        self._grip = 0.0  # closing fraction commanded
        self._grip_sent: float | None = None
        self._meas: np.ndarray | None = None  # measured x, y, z (mm), yaw (deg) of the last good read
        self.max_io_errors = cfg.max_io_errors
        self._restore: list[tuple[str, Any]] = []  # (what, how) to undo at close, in order

    # -- lifecycle ------------------------------------------------------------------------------------
    def _check(self, what: str, ret: Any) -> None:
        code = _code(ret)
        if code != 0:
            raise RuntimeError(f"xArm {what} failed with code {code}{self._error_text()}")

    def _error_text(self) -> str:
        try:
            _, (err, warn) = self.arm.get_err_warn_code()
        except Exception:  # noqa: BLE001 - only for the message
            return ""
        return f" (controller error {err}, warning {warn})" if err or warn else ""

    def connect(self) -> None:
        if self.arm is not None and self.arm.connected:
            return
        if not self.cfg.ip:
            raise ValueError("driver=xarm needs the control box address: driver_args.ip=192.168.1.x")
        try:
            from xarm.wrapper import XArmAPI
        except ImportError as e:
            raise RuntimeError(f"driver=xarm needs the xArm SDK ({e}): pip install 'qc-robot[xarm]'") from e
        kwargs = {"is_radian": False, "report_type": "normal", **self.cfg.sdk_args}
        try:
            self.arm = XArmAPI(self.cfg.ip, **kwargs)
        except Exception as e:  # the SDK raises a bare Exception when the socket does not connect
            raise RuntimeError(f"could not connect to the xArm control box at {self.cfg.ip}: {e}") from e
        if not self.arm.connected:
            raise RuntimeError(f"could not connect to the xArm control box at {self.cfg.ip}")
        arm, c = self.arm, self.cfg
        self._check("clean_warn", arm.clean_warn())
        self._check("motion_enable", arm.motion_enable(enable=True))
        mode0 = int(arm.mode)
        self._restore = [("mode", lambda: arm.set_mode(mode0))]
        if c.controller_fence:
            self._program_boundary()
        if c.gripper:
            self._check("set_gripper_mode", arm.set_gripper_mode(0))
            self._check("set_gripper_enable", arm.set_gripper_enable(True))
            self._check("set_gripper_speed", arm.set_gripper_speed(c.gripper_speed))

    def _program_boundary(self) -> None:
        """The workspace box as the controller's boundary, enforced: box, speed and fence, then
        reduced mode on (the SDK: boundary settings take effect when reduced mode is set on)."""
        arm, c = self.arm, self.cfg
        code, states = arm.get_reduced_states(is_radian=False)
        self._check("get_reduced_states", code)
        on0, box0, speed0, fence0 = bool(states[0]), list(states[1]), float(states[2]), bool(states[-2])
        box = [self._hi[0], self._lo[0], self._hi[1], self._lo[1], self._hi[2], self._lo[2]]
        self._check("set_reduced_tcp_boundary", arm.set_reduced_tcp_boundary(box))
        self._check("set_reduced_max_tcp_speed", arm.set_reduced_max_tcp_speed(c.speed_mm_s))
        self._check("set_fence_mode", arm.set_fence_mode(True))
        self._check("set_reduced_mode", arm.set_reduced_mode(True))
        self._restore += [("boundary", lambda: arm.set_reduced_tcp_boundary(box0)),
                          ("reduced speed", lambda: arm.set_reduced_max_tcp_speed(speed0)),
                          ("fence mode", lambda: arm.set_fence_mode(fence0)),
                          ("reduced mode", lambda: arm.set_reduced_mode(on0))]

    def close(self) -> None:
        """Stop motion (state 4; the arm holds on its brakes on power loss), restore every setting
        changed at connect, disconnect. Never raises: failures are logged (a dead link must not
        hide the error that ended the run)."""
        if self.arm is None or not self.arm.connected:
            return
        steps: list[tuple[str, Any]] = [("stop", self.park), *self._restore]
        for i, (what, undo) in enumerate(steps):
            try:
                code = _code(undo() or 0)
            except Exception as e:  # noqa: BLE001 - best effort, every step
                log.error("xArm close: %s failed: %s", what, e)
                code = NO_REPLY if "code 3" in str(e) else 0
            else:
                if code:
                    log.error("xArm close: %s failed with code %d", what, code)
            if code == NO_REPLY or not self.arm.connected:  # each further call would wait as long
                log.error("xArm close: the control box does not answer; not done: %s",
                          ", ".join(w for w, _ in steps[i + 1:]) or "-")
                break
        try:
            self.arm.disconnect()
        except Exception as e:  # noqa: BLE001
            log.error("xArm close: disconnect failed: %s", e)
        self._restore = []

    def _start(self) -> None:
        """Mode 7 (online Cartesian planning), state 0 (ready); refuses while the box has an error."""
        _, (err, _warn) = self.arm.get_err_warn_code()
        if err:
            raise RuntimeError(f"xArm controller error {err}: clear it (pendant / xArm Studio / "
                               f"arm.clean_error()) once the cause is fixed, then reset again")
        self._check("set_mode", self.arm.set_mode(7))
        self._check("set_state", self.arm.set_state(0))

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Move to home (tool down, gripper open) and wait until there; the seed is ignored."""
        self.connect()
        self._start()
        c = self.cfg
        self._target = np.r_[np.asarray(c.home_mm, np.float64), c.home_yaw_deg]
        self._grip, self._grip_sent = 0.0, None
        self._send_target()
        self._send_gripper(wait=True)
        deadline = time.monotonic() + c.reset_timeout_s
        while True:
            code, pose = self.arm.get_position(is_radian=False)
            yaw_err = (float(pose[5]) - self._target[3] + 180.0) % 360.0 - 180.0
            if code == 0 and np.all(np.abs(np.asarray(pose[:3]) - self._target[:3]) < 1.0) and abs(yaw_err) < 1.0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"xArm did not reach home within {c.reset_timeout_s} s "
                                   f"(at {list(pose[:3])} mm, yaw {pose[5]}°){self._error_text()}")
            time.sleep(1.0 / c.control_hz)
        self._reset_steps()
        self._io_clear()
        return self.get_observation()

    # -- observation ----------------------------------------------------------------------------------
    def get_observation(self) -> dict[str, np.ndarray]:
        try:
            code, pose = self.arm.get_position(is_radian=False)
            self._check("get_position", code)
            grip = self._grip
            if self.cfg.gripper:
                gcode, gpos = self.arm.get_gripper_position()
                self._check("get_gripper_position", gcode)
                grip = (GRIPPER_OPEN - float(gpos)) / (GRIPPER_OPEN - GRIPPER_CLOSED)
        except Exception as e:  # the safety layer holds; past the budget the episode ends
            raise self._io_failed("read", e) from e
        self._io_ok()
        x, y, z, yaw = pose[0], pose[1], pose[2], pose[5]
        self._meas = np.array([x, y, z, yaw], np.float64)
        obs = np.array([x / 1e3, y / 1e3, z / 1e3, math.radians(yaw), grip], np.float32)
        return {self.cfg.obs_key: obs}

    # -- commands -------------------------------------------------------------------------------------
    @property
    def target(self) -> np.ndarray:
        """The tool target: x, y, z (mm), yaw (deg), gripper closing fraction."""
        return np.r_[self._target, self._grip]

    def _send_target(self) -> None:
        x, y, z, yaw = (float(v) for v in self._target)
        c = self.cfg
        self._check("set_position", self.arm.set_position(x, y, z, c.roll_deg, c.pitch_deg, yaw, speed=c.speed_mm_s,
                                                           mvacc=c.acc_mm_s2, wait=False))

    def _send_gripper(self, wait: bool = False) -> None:
        if not self.cfg.gripper:
            return
        pos = GRIPPER_OPEN + self._grip * (GRIPPER_CLOSED - GRIPPER_OPEN)
        if self._grip_sent is not None and abs(pos - self._grip_sent) < 1.0:
            return  # unchanged: spare the tool bus a round trip
        # wait_motion=False: the SDK would otherwise first wait for the arm's motion to finish
        self._check("set_gripper_position", self.arm.set_gripper_position(pos, wait=wait, wait_motion=False))
        self._grip_sent = pos

    def _apply(self, action: np.ndarray) -> None:
        c = self.cfg
        a = action.astype(np.float64)
        step = np.array([c.step_mm] * 3 + [c.step_yaw_deg])
        target = self._target + a[:4] * step
        if self._meas is not None:  # never more than one step from where the arm was measured
            target = np.clip(target, self._meas - step, self._meas + step)
        target[:3] = np.clip(target[:3], self._lo, self._hi)  # the workspace box
        target[3] = float(np.clip(target[3], self._yaw_lo, self._yaw_hi))
        grip = float(np.clip(self._grip + a[4] * c.gripper_step, 0.0, 1.0))
        try:
            if not np.array_equal(target, self._target):
                self._target = target
                self._send_target()
            self._grip = grip
            self._send_gripper()
            self._io_ok("command")
        except Exception as e:  # a skipped command; past the budget the episode ends
            err = self._io_failed("command", e)
            if isinstance(err, IOBudgetSpent):
                raise err from e
        self._count_step(self.spec.max_episode_steps)

    def stop(self) -> None:
        """Stop motion now (state 4); ``reset`` makes the arm ready again."""
        self._check("set_state(4)", self.arm.set_state(4))
