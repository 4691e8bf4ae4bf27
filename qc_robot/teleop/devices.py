"""Teleop devices behind one small interface: ``read() -> TeleopCommand(action, events)``.

A device turns operator input into a 5-D end-effector command in the OGBench layout
(``[dx, dy, dz, dyaw, gripper]`` in [-1, 1]; gripper +1 closes, -1 opens, relative) plus
session events (start, end as success/failure, discard, quit). The session does not care which
device it talks to: keyboard (``qc_robot.teleop.keyboard``), gamepad (evdev), 3D mouse
(pyspacemouse), or the scripted operator that drives the same path in tests
(``qc_robot.teleop.scripted``). A LeRobot leader arm (``device=lerobot``) is the exception to the
5-D layout: it commands the follower's joints directly, in the follower driver's action space.
Hardware libraries are imported when a device opens, so they stay optional extras
(``pip install qc-robot[teleop]`` / ``qc-robot[lerobot]``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# Re-exported: callers import the device interface from here, as before it moved to the leaf.
from qc_robot.drivers.late_replies import drop_late_replies, serial_ports
from qc_robot.teleop.device_base import ACTION_DIM as ACTION_DIM
from qc_robot.teleop.device_base import Event, TeleopCommand, TeleopDevice

log = logging.getLogger("qc_robot.teleop")


def _missing(extra: str, err: ImportError) -> RuntimeError:
    return RuntimeError(f"this device needs {extra!r} ({err}); install it with "
                        f"`pip install 'qc-robot[teleop]'` or `pip install {extra}`")


class GamepadDevice(TeleopDevice):
    """A gamepad through Linux evdev: left stick x/y, right stick z/yaw, buttons for events.

    A (south) toggles the gripper, Start starts, Y (north) success, B (east) failure,
    X (west) discard, Select quits; in ``drive`` the left shoulder (LB) takes over while held and
    Mode pauses. Axis values are normalised by the device's own range.
    """

    name = "gamepad"

    def __init__(self, path: str = "", speed: float = 0.5, deadzone: float = 0.1) -> None:
        self.path, self.speed, self.deadzone = path, speed, deadzone
        self._dev: Any = None
        self._axes: dict[int, float] = {}
        self._gripper = -1.0
        self._pending: list[Event] = []
        self._takeover = False

    def open(self) -> None:
        try:
            import evdev
        except ImportError as e:
            raise _missing("evdev", e) from None
        self._ev = evdev.ecodes
        paths = [self.path] if self.path else evdev.list_devices()
        for p in paths:
            dev = evdev.InputDevice(p)
            caps = dev.capabilities()
            if evdev.ecodes.EV_ABS in caps and evdev.ecodes.EV_KEY in caps:
                self._dev = dev
                self._absinfo = {code: info for code, info in caps[evdev.ecodes.EV_ABS]}
                return
        raise RuntimeError(f"no gamepad found among {paths or 'the input devices (check permissions on /dev/input)'}")

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def _norm(self, code: int, value: int) -> float:
        info = self._absinfo.get(code)
        if info is None or info.max == info.min:
            return 0.0
        v = 2.0 * (value - info.min) / (info.max - info.min) - 1.0
        return 0.0 if abs(v) < self.deadzone else float(v)

    def read(self) -> TeleopCommand:
        e = self._ev
        buttons = {e.BTN_START: Event.START, e.BTN_NORTH: Event.SUCCESS, e.BTN_EAST: Event.FAILURE,
                   e.BTN_WEST: Event.DISCARD, e.BTN_SELECT: Event.QUIT, e.BTN_MODE: Event.PAUSE}
        try:
            for ev in iter(self._dev.read_one, None):
                if ev.type == e.EV_ABS:
                    self._axes[ev.code] = self._norm(ev.code, ev.value)
                elif ev.type == e.EV_KEY and ev.code == e.BTN_TL:  # takeover while held (1 down, 0 up)
                    self._takeover = ev.value != 0
                elif ev.type == e.EV_KEY and ev.value == 1:
                    if ev.code == e.BTN_SOUTH:
                        self._gripper = -self._gripper
                    elif ev.code in buttons:
                        self._pending.append(buttons[ev.code])
        except OSError:  # unplugged: no command (the safety layer holds), tell the operator
            return TeleopCommand(None, [], takeover=self._takeover)
        ax = self._axes
        a = np.array([-ax.get(e.ABS_Y, 0.0), -ax.get(e.ABS_X, 0.0), -ax.get(e.ABS_RY, 0.0),
                      -ax.get(e.ABS_RX, 0.0), 0.0], np.float32) * self.speed
        a[4] = self._gripper
        events, self._pending = self._pending, []
        return TeleopCommand(np.clip(a, -1, 1), events, takeover=self._takeover)

    def help(self) -> str:
        return ("gamepad: left stick x/y, right stick z/yaw, A gripper, Start start/ready, Y success, "
                "B failure, X discard, Select quit/end; drive: hold LB to take over, Mode pause")


class SpaceMouseDevice(TeleopDevice):
    """A 3Dconnexion SpaceMouse through pyspacemouse: translation → xyz, twist → yaw.

    Left button toggles the gripper; right button ends the episode as a success. Start, failure,
    discard and quit come from the keyboard when the session runs in a terminal (see make_device).
    In ``drive`` the operator takes over while the cap is pushed beyond the deadzone (HIL-SERL's
    rule) or the gripper button is pressed.
    """

    name = "spacemouse"

    def __init__(self, speed: float = 0.5, deadzone: float = 0.05) -> None:
        self.speed, self.deadzone = speed, deadzone
        self._sm: Any = None
        self._gripper = -1.0
        self._buttons = [0, 0]

    def open(self) -> None:
        try:
            import pyspacemouse
        except ImportError as e:
            raise _missing("pyspacemouse", e) from None
        if not pyspacemouse.open():
            raise RuntimeError("no SpaceMouse found (check the USB connection and hidraw permissions)")
        self._sm = pyspacemouse

    def close(self) -> None:
        if self._sm is not None:
            self._sm.close()
            self._sm = None

    def read(self) -> TeleopCommand:
        s = self._sm.read()
        v = np.array([s.y, -s.x, s.z, -s.yaw], np.float32)
        v[np.abs(v) < self.deadzone] = 0.0
        events: list[Event] = []
        buttons = list(getattr(s, "buttons", getattr(s, "button", [])))[:2] + [0, 0]
        if buttons[0] and not self._buttons[0]:
            self._gripper = -self._gripper
        if buttons[1] and not self._buttons[1]:
            events.append(Event.SUCCESS)
        self._buttons = buttons[:2]
        a = np.append(np.clip(v * self.speed, -1, 1), self._gripper).astype(np.float32)
        return TeleopCommand(a, events, takeover=bool(np.any(v != 0.0) or buttons[0]))

    def help(self) -> str:
        return "spacemouse: push/pull/lift = xyz, twist = yaw, left button gripper, right button success"


class LeRobotLeaderDevice(TeleopDevice):
    """A LeRobot ``Teleoperator`` (e.g. an ``so101_leader`` arm) commanding a LeRobot follower.

    Each read takes the leader's joint positions (``get_action``) and turns them into the follower
    driver's action with ``to_action`` (the follower's calibrated ranges, so the same pose on both
    arms is the same target; in delta mode the bounded step toward it). A failed bus read is
    "no command this tick": the safety layer holds. Events (start, verdicts, quit) come from the terminal's keys (see make_device).
    """

    name = "lerobot"

    def __init__(self, to_action: Callable[[Mapping[str, float]], np.ndarray], teleop_type: str = "so101_leader",
                 teleop_args: Mapping[str, Any] | None = None, teleop: Any = None,
                 distance: Callable[[Mapping[str, float]], float] | None = None,
                 takeover_threshold: float = 0.0) -> None:
        """``teleop``: an already built LeRobot Teleoperator; else built from type and args.
        ``distance(joints)``: how far the leader's pose is from the follower's measured one (the
        follower's units); with ``takeover_threshold`` > 0 the operator takes over (``drive``)
        while it exceeds the threshold."""
        self.to_action, self.teleop_type, self.teleop_args = to_action, teleop_type, dict(teleop_args or {})
        self.teleop = teleop
        self._ports: list[Any] = []  # the leader bus's serial port, found at connect
        self.read_errors = 0
        self.distance, self.takeover_threshold = distance, takeover_threshold

    @classmethod
    def for_driver(cls, driver: Any, teleop_type: str = "so101_leader", teleop_args: Mapping[str, Any] | None = None,
                   teleop: Any = None, takeover_threshold: float = 0.0) -> LeRobotLeaderDevice:
        """The leader for a ``qc_robot.drivers.lerobot_driver.LeRobotDriver`` (bare or behind the safety layer)."""
        inner = getattr(driver, "driver", driver)
        towards = getattr(inner, "action_towards", None)
        if towards is None:
            raise ValueError("device=lerobot needs driver=lerobot (it commands the follower's joints)")
        return cls(towards, teleop_type, teleop_args, teleop, getattr(inner, "joint_distance", None),
                   takeover_threshold)

    def open(self) -> None:
        if self.teleop is None:
            from qc_robot.drivers.lerobot_driver import make_lerobot_teleoperator

            self.teleop = make_lerobot_teleoperator(self.teleop_type, self.teleop_args)
        if not self.teleop.is_connected:
            self.teleop.connect(calibrate=False)
        self._ports = serial_ports(self.teleop)
        if not self.teleop.is_calibrated:
            self.teleop.disconnect()
            raise RuntimeError(f"{self.teleop} is not calibrated; run `lerobot-calibrate --teleop.type="
                               f"{self.teleop_type} --teleop.port=... --teleop.id={self.teleop.id}`")

    def close(self) -> None:
        if self.teleop is not None and self.teleop.is_connected:
            self.teleop.disconnect()

    def read(self) -> TeleopCommand:
        drop_late_replies(self._ports)  # a late reply would be read as this tick's
        try:
            joints = self.teleop.get_action()
        except Exception as e:  # a glitch on the leader's bus: hold this tick, keep the session
            self.read_errors += 1
            log.warning("leader read failed (%d so far): %s", self.read_errors, e)
            return TeleopCommand(None, [], takeover=None)
        takeover = None
        if self.distance is not None and self.takeover_threshold > 0:
            takeover = bool(self.distance(joints) > self.takeover_threshold)
        return TeleopCommand(np.asarray(self.to_action(joints), np.float32), [], takeover=takeover)

    def help(self) -> str:
        return f"lerobot: move the {self.teleop_type} arm; the follower copies its joints"


class MergedDevice(TeleopDevice):
    """Motion from one device, events from both (a SpaceMouse plus the terminal's keys)."""

    def __init__(self, motion: TeleopDevice, events: TeleopDevice) -> None:
        self.motion, self.events = motion, events
        self.name = f"{motion.name}+{events.name}"

    def open(self) -> None:
        self.motion.open()
        try:
            self.events.open()
        except Exception:
            self.motion.close()
            raise

    def close(self) -> None:
        self.events.close()
        self.motion.close()

    def read(self) -> TeleopCommand:
        m, e = self.motion.read(), self.events.read()
        return TeleopCommand(m.action, m.events + e.events,
                             takeover=m.takeover if e.takeover is None else bool(m.takeover) or e.takeover)

    def help(self) -> str:
        return self.motion.help() + "\n" + self.events.help()


def make_device(name: str, speed: float = 0.5, **kw: Any) -> TeleopDevice:
    """'keyboard', 'gamepad', 'spacemouse', 'lerobot' (the last three + terminal keys for events
    when stdin is a tty). 'lerobot' needs ``driver=`` (the follower) and takes ``teleop_type`` and
    ``teleop_args`` (the LeRobot teleoperator's config type and arguments).

    The scripted operator needs the simulator and is built by the session, not here.
    """
    from qc_robot.teleop.keyboard import KeyboardDevice

    if name == "keyboard":
        return KeyboardDevice(speed=speed, **kw)
    motion: TeleopDevice
    if name == "lerobot":
        motion = LeRobotLeaderDevice.for_driver(kw.pop("driver", None), **kw)
    elif name == "gamepad":
        motion = GamepadDevice(speed=speed)
    elif name == "spacemouse":
        motion = SpaceMouseDevice(speed=speed)
    else:
        raise ValueError(f"unknown teleop device {name!r}; known: keyboard, gamepad, spacemouse, lerobot, scripted")
    return MergedDevice(motion, KeyboardDevice(speed=speed, motion=False)) if sys.stdin.isatty() else motion
