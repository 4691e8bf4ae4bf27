"""A robot that does not outrun its learner: wait at the reset while the learner is behind.

A learner slower than the robot (any CPU learner against a 20 Hz arm) falls further behind its
UTD target with every episode: the robot keeps collecting with an ever older policy, and what it
sends piles up unread. The learner reports the updates it owes (``ack.behind``); the server
relays the figure in its heartbeat echoes (``heartbeat.learner_behind``), and ``drive`` holds
the robot at its reset while it exceeds ``learner_wait`` updates. No learner (or one that caught
up) costs nothing; the robot time spent waiting is counted and reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.safety import SafeDriver

log = logging.getLogger("qc_robot.drive")


class LearnerPace:
    """``drive learner_wait``: holds at each reset while the learner owes more than ``limit``
    updates, at most ``max_s`` seconds a time (0: no cap). Call it as ``run_episode``'s
    ``learner_wait``."""

    def __init__(self, client: PolicyClient, driver: SafeDriver, limit: int, max_s: float, period_s: float,
                 on_word: Callable[[int], None] | None = None) -> None:
        self.client, self.driver = client, driver
        self.limit, self.max_s, self.period_s = limit, max_s, period_s
        self.on_word = on_word
        """Called with each figure the server sends while waiting (a test's view of the wait)."""
        self.waits = 0
        """Resets at which the robot waited."""
        self.wait_s = 0.0
        self.gave_up = 0
        """Waits cut at ``max_s`` with the learner still behind."""
        self._tick = threading.Event()  # never set: a cancellable wait of one control period

    def __call__(self) -> float:
        if self.limit <= 0:
            return 0.0
        t0 = time.monotonic()
        said = False
        while True:
            t_tick = time.monotonic()
            if self.client.ping(timeout_s=self.period_s) is None:
                break  # no server to ask: the loop's own server-loss handling takes over
            behind = self.client.learner_behind
            if self.on_word is not None:
                self.on_word(behind)
            if behind <= self.limit:  # caught up, or no learner
                break
            if not said:
                log.warning("the learner owes %d updates (limit %d): the robot waits at its reset", behind,
                            self.limit)
                said = True
                if self.driver.end_reason is None:  # a latched stop stays latched until the reset
                    self.driver.rearm()  # a hold we chose: not the watchdog's missing-action trip
            if self.max_s > 0 and time.monotonic() - t0 >= self.max_s:
                self.gave_up += 1
                log.warning("waited %.0f s for the learner (still %d updates behind): going on", self.max_s, behind)
                break
            if self.driver.realtime:
                self.driver.act(None)  # the robot holds its reset pose
            self._tick.wait(max(0.0, self.period_s - (time.monotonic() - t_tick)))  # the control period
        waited = time.monotonic() - t0 if said else 0.0
        self.waits += said
        self.wait_s += waited
        return waited
