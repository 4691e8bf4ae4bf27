"""Running ``runner.run_episode`` against a driver with a scripted action source instead of a server.

``ScriptedActions`` stands where the chunk executor stands in ``qc-robot drive``: per tick it gives
the action a script chooses (or None: no fresh action, so the safety layer holds). Everything
below it (the control loop, the safety layer, the driver, the simulated bus or control box) is
the product's own code. ``TickClock`` is the safety layer's clock advanced by ticks, so a watchdog
trips at a known tick whatever the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qc_robot.drivers.base import ExecutedStep
from qc_robot.drivers.runner import EpisodeResult, run_episode
from qc_robot.drivers.safety import SafeDriver


@dataclass
class _Stats:
    chunks: int = 0
    rtt_ms: list[float] = field(default_factory=list)


class TickClock:
    """The safety layer's clock: ``period`` seconds per tick of the script."""

    def __init__(self, period: float) -> None:
        self.period, self.ticks = period, 0

    def __call__(self) -> float:
        return self.ticks * self.period


class ScriptedActions:
    """``script(step) -> action | None`` per tick, in the executor's place."""

    chunk_len = 1
    last_version = ""  # no policy gave these actions (the executor's property)

    def __init__(self, script: Callable[[int], np.ndarray | None], clock: TickClock | None = None) -> None:
        self.script, self.clock = script, clock
        self.stats = _Stats()
        self.asked: list[bool] = []
        """Per tick the loop asked for an action: whether the script gave one."""

    def reset(self) -> None:
        pass

    def act(self, obs: dict[str, np.ndarray], step: int, episode_id: int) -> np.ndarray | None:
        if self.clock is not None:
            self.clock.ticks += 1
        a = self.script(step)
        self.asked.append(a is not None)
        return a

    def idle(self, deadline: float, next_step: int) -> None:
        pass


def run_scripted(driver: SafeDriver, script: Callable[[int], np.ndarray | None], max_steps: int = 0,
                 clock: TickClock | None = None,
                 on_rows: Callable[[list[ExecutedStep]], None] | None = None) -> tuple[EpisodeResult, list[ExecutedStep]]:
    """One episode of the real control loop; returns its result and every row it produced."""
    rows: list[ExecutedStep] = []

    def keep(new: list[ExecutedStep]) -> None:
        rows.extend(new)
        if on_rows is not None:
            on_rows(new)

    ex = ScriptedActions(script, clock)
    res = run_episode(driver, ex, 0, 0, max_steps=max_steps, on_rows=keep, stall_timeout_s=5.0)  # type: ignore[arg-type]
    return res, rows
