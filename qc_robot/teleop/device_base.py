"""The teleop device interface and its command type: the leaf that every device module imports.

``devices`` (the hardware devices and ``make_device``) and ``keyboard`` both build on these names;
keeping them here, not in ``devices``, means neither imports the other at module level.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

ACTION_DIM = 5  # dx, dy, dz, dyaw, gripper

class Event(str, enum.Enum):
    START = "start"
    SUCCESS = "success"
    """End the episode and label it a success."""
    FAILURE = "failure"
    DISCARD = "discard"
    """Drop the episode in progress and record it again."""
    QUIT = "quit"
    """End the session (``drive``: the episode in progress ends truncated, then the run stops)."""
    PAUSE = "pause"
    """``drive``: hold the robot until pressed again (the policy resumes from the state then)."""


@dataclass
class TeleopCommand:
    action: np.ndarray | None
    """(5,) float32 command, or None for "no command this tick" (the safety layer holds)."""
    events: list[Event] = field(default_factory=list)
    takeover: bool | None = None
    """``drive``: the operator holds the robot's controls this tick (a held button, a device
    moved away from the follower, a toggled key); None: this device does not say."""


class TeleopDevice(ABC):
    """One operator input device. ``open``/``close`` bracket use; ``read`` never blocks."""

    name: str = "device"

    def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire the device (terminal mode, HID handle)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release it; must restore whatever ``open`` changed."""

    @abstractmethod
    def read(self) -> TeleopCommand:
        """The command for this control tick and any events since the last read."""

    def help(self) -> str:
        """Key/button help printed when the session starts."""
        return ""

    def episode_started(self, obs: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Called after the robot was reset for a new episode."""

    def episode_ended(self) -> None:  # noqa: B027 - optional hook
        """Called when the episode ends (any reason)."""

    def detector_fired(self) -> None:  # noqa: B027 - optional hook
        """``drive reward_model=``: the success detector ended the episode; the next reads are the
        review window, where a verdict confirms or overrules it (before ``episode_ended``)."""

    def __enter__(self) -> TeleopDevice:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
