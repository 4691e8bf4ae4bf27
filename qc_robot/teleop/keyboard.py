"""Keyboard teleop in a plain terminal (ssh, tmux, no X): cbreak tty mode, termios + select.

A terminal reports key presses, not releases; a held key arrives as auto-repeated bytes. So a
motion key drives its axis for ``hold_s`` after its last byte (longer than the auto-repeat
interval, so holding a key moves smoothly); the gripper is a toggle. cbreak keeps Ctrl-C working
(it raises KeyboardInterrupt, which the session treats as quit).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

import numpy as np

from qc_robot.teleop.device_base import ACTION_DIM, Event, TeleopCommand, TeleopDevice

# key -> (action index, sign)
MOTION_KEYS: dict[str, tuple[int, float]] = {
    "w": (0, 1.0), "s": (0, -1.0), "up": (0, 1.0), "down": (0, -1.0),
    "a": (1, 1.0), "d": (1, -1.0), "left": (1, 1.0), "right": (1, -1.0),
    "r": (2, 1.0), "f": (2, -1.0),
    "q": (3, 1.0), "e": (3, -1.0),
}  # fmt: skip
EVENT_KEYS: dict[str, Event] = {"enter": Event.START, "g": Event.SUCCESS, "b": Event.FAILURE,
                                "x": Event.DISCARD, "esc": Event.QUIT, "p": Event.PAUSE}
TAKEOVER_KEY = "t"
"""``drive``: toggles the operator's takeover (a terminal reports no key releases, so no hold)."""
_ESCAPES = {b"[A": "up", b"[B": "down", b"[C": "right", b"[D": "left", b"OA": "up", b"OB": "down",
            b"OC": "right", b"OD": "left"}

HELP = """keys:  w/s or up/down: x+/x-    a/d or left/right: y+/y-    r/f: z up/down    q/e: yaw
       space: gripper close/open    +/-: speed
       Enter: start episode    g: end as success    b: end as failure    x: discard & re-record
       Esc or Ctrl-C: quit (an episode in progress is discarded)
drive:  Enter: ready (after the reset)    t: take over / hand back    p: pause / resume
       g / b: success / failure    x: discard    Esc: end the run"""


def parse_keys(data: bytes) -> list[str]:
    """Terminal bytes → key names: 'w', 'space', 'enter', 'esc', 'up', ... (unknown bytes kept)."""
    keys: list[str] = []
    i = 0
    while i < len(data):
        b = data[i : i + 1]
        if b == b"\x1b":
            seq = data[i + 1 : i + 3]
            if seq in _ESCAPES:
                keys.append(_ESCAPES[seq])
                i += 3
                continue
            if seq[:1] in (b"[", b"O"):  # another escape sequence (F-keys, ...): skip it whole
                j = i + 2
                while j < len(data) and not (0x40 <= data[j] <= 0x7E):
                    j += 1
                i = j + 1
                continue
            keys.append("esc")
        elif b in (b"\r", b"\n"):
            keys.append("enter")
        elif b == b" ":
            keys.append("space")
        else:
            keys.append(b.decode("latin-1").lower())
        i += 1
    return keys


class KeyboardDevice(TeleopDevice):
    """Keys on a terminal file descriptor (default: stdin) → end-effector deltas and events."""

    name = "keyboard"

    def __init__(self, fd: int | None = None, speed: float = 0.5, hold_s: float = 0.25,
                 motion: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.fd = fd
        self.speed, self.hold_s, self.motion, self.clock = speed, hold_s, motion, clock
        self.takeover = False
        """``drive``: the operator has the controls (toggled by ``t``)."""
        self._saved: list | None = None
        self._until = np.zeros(ACTION_DIM - 1)  # per axis: active until this time
        self._sign = np.zeros(ACTION_DIM - 1)
        self.gripper = -1.0  # open
        self.last_keys: list[str] = []

    def open(self) -> None:
        if self.fd is None:
            import sys

            self.fd = sys.stdin.fileno()
        if os.isatty(self.fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)  # no line buffering, no echo; Ctrl-C still works

    def close(self) -> None:
        if self._saved is not None and self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _read_bytes(self) -> bytes:
        assert self.fd is not None, "open() the device first"
        out = b""
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 1024)
            if not chunk:  # EOF: the terminal is gone
                return out + b"\x1b"
            out += chunk
            if out.endswith(b"\x1b") and select.select([self.fd], [], [], 0.03)[0]:
                continue  # an escape sequence split across reads: wait briefly for its rest
        return out

    def feed(self, keys: list[str]) -> list[Event]:
        """Apply key names to the device state; returns the events they raise."""
        now = self.clock()
        events: list[Event] = []
        for k in keys:
            if k in EVENT_KEYS:
                events.append(EVENT_KEYS[k])
            elif k == TAKEOVER_KEY:
                self.takeover = not self.takeover
            elif not self.motion:
                continue
            elif k in MOTION_KEYS:
                axis, sign = MOTION_KEYS[k]
                self._sign[axis], self._until[axis] = sign, now + self.hold_s
            elif k == "space":
                self.gripper = -self.gripper
            elif k in ("+", "="):
                self.speed = min(1.0, round(self.speed + 0.1, 2))
            elif k == "-":
                self.speed = max(0.1, round(self.speed - 0.1, 2))
        return events

    def read(self) -> TeleopCommand:
        self.last_keys = parse_keys(self._read_bytes())
        events = self.feed(self.last_keys)
        active = self._until > self.clock()
        a = np.zeros(ACTION_DIM, np.float32)
        a[:4] = np.where(active, self._sign * self.speed, 0.0)
        a[4] = self.gripper
        return TeleopCommand(a if self.motion else None, events, takeover=self.takeover)

    def help(self) -> str:
        return HELP
