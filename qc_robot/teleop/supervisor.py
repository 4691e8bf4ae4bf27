"""``drive operator=scripted``: a simulated human supervising a policy on the (blind) sim.

It plays the operator of a real-arm fine-tuning session so that the whole path runs in CI with
no hardware and no human:

* **verdicts**: it presses "success" as soon as the simulator's hidden success holds (the sim
  driver with ``blind=true`` withholds reward and success from the loop, as a real arm does, and
  exposes them only through ``SimDriver.hidden_info``, which this operator alone reads); with
  ``verdicts=false`` the success detector (``drive reward_model=``) decides instead, and this
  operator reviews its fires against the truth (overruling the false ones) and, with
  ``missed_after``, presses "success" on a success the detector has not fired on in that many ticks;
* **takeovers**: when the policy makes no progress for ``patience`` steps (the target cube and
  the gripper no closer to where they must go, by ``progress_eps``) it takes over with OGBench's
  cube oracle for ``takeover_steps`` steps, at most ``max_takeovers`` times an episode, each with
  probability ``rate`` (the takeover-rate knob);
* **resets**: it presses "ready" ``ready_after`` ticks into each reset phase.

The oracle reads the simulator's state, so use it with the lockstep sim (``realtime=false``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qc_robot.teleop.devices import Event, TeleopCommand, TeleopDevice
from qc_robot.teleop.operator import OperatorConfig
from qc_robot.teleop.scripted import SUCCESS_RADIUS, ScriptedOperator


class ScriptedSupervisor(TeleopDevice):
    """The scripted operator of ``drive`` (module docstring)."""

    name = "scripted"

    def __init__(self, sim: Any, cfg: OperatorConfig) -> None:
        """``sim``: the bare ``SimDriver`` (its env and hidden outcome are read)."""
        self.sim, self.cfg = sim, cfg
        self.oracle = ScriptedOperator(lambda: sim.env, cfg.oracle, cfg.noise, cfg.seed)
        self._rng = np.random.default_rng(cfg.seed + 7)
        self._in_episode = False
        self._reset_ticks = 0
        self._best = np.inf
        self._since = 0
        self._left = 0
        self._takeovers = 0
        self._reviewing = False
        self._success_ticks = 0

    @classmethod
    def for_driver(cls, driver: Any, cfg: OperatorConfig) -> ScriptedSupervisor:
        from qc_robot.drivers.sim import SimDriver

        inner = driver
        while not isinstance(inner, SimDriver) and hasattr(inner, "driver"):
            inner = inner.driver
        if not isinstance(inner, SimDriver):
            raise ValueError("operator=scripted needs driver=sim (its oracle and verdicts read the simulator)")
        return cls(inner, cfg)

    def help(self) -> str:
        c = self.cfg
        judges = ("verdicts from the sim's hidden success" if c.verdicts else
                  "reviews the detector's fires against the sim's hidden success"
                  + (f", presses success on one it missed for {c.missed_after} ticks" if c.missed_after > 0 else ""))
        return (f"scripted operator: {judges}; takes over with the {c.oracle} "
                f"oracle after {c.patience} steps without progress ({c.takeover_steps} steps, at most "
                f"{c.max_takeovers} an episode, rate {c.rate:g}); ready after {c.ready_after} reset ticks")

    def episode_started(self, obs: Mapping[str, np.ndarray]) -> None:
        self.oracle.episode_started(obs)
        self._in_episode = True
        self._best, self._since, self._left, self._takeovers = np.inf, 0, 0, 0
        self._success_ticks = 0

    def episode_ended(self) -> None:
        self.oracle.episode_ended()
        self._in_episode, self._reset_ticks, self._reviewing = False, 0, False

    def detector_fired(self) -> None:
        self._reviewing = True

    def _potential(self) -> float:
        """Metres still to go: the gripper to the first unsolved cube, and every cube to its goal."""
        env = self.sim.env.unwrapped
        info = env.compute_ob_info()
        goals = np.asarray(env.cur_task_info["goal_xyzs"])  # (num_cubes, 3)
        gaps = [float(np.linalg.norm(info[f"privileged/block_{i}_pos"] - goals[i])) for i in range(len(goals))]
        todo = [i for i, g in enumerate(gaps) if g > SUCCESS_RADIUS]
        if not todo:
            return 0.0
        reach = float(np.linalg.norm(info["proprio/effector_pos"] - info[f"privileged/block_{todo[0]}_pos"]))
        return reach + sum(gaps)

    def read(self) -> TeleopCommand:
        if not self._in_episode:  # the reset phase: press ready after a while
            self._reset_ticks += 1
            return TeleopCommand(None, [Event.START] if self._reset_ticks > self.cfg.ready_after else [])
        if self._reviewing:  # the detector ended the episode: confirm it, or overrule a false fire
            return TeleopCommand(None, [Event.SUCCESS if self.sim.hidden_info().success else Event.FAILURE])
        if self.cfg.verdicts or self.cfg.missed_after > 0:
            success = self.sim.hidden_info().success
            self._success_ticks = self._success_ticks + 1 if success else 0
            if success and (self.cfg.verdicts or self._success_ticks >= self.cfg.missed_after):
                return TeleopCommand(None, [Event.SUCCESS], takeover=False)
        pot = self._potential()
        if pot < self._best - self.cfg.progress_eps:
            self._best, self._since = pot, 0
        else:
            self._since += 1
        if self._left == 0 and self._since >= self.cfg.patience and self._takeovers < self.cfg.max_takeovers:
            self._since = 0
            if self._rng.random() < self.cfg.rate:
                self._takeovers += 1
                self._left = self.cfg.takeover_steps
                self.oracle.replan()
        if self._left > 0:
            self._left -= 1
            if self._left == 0:  # hand back: the policy gets a fresh patience from here
                self._best, self._since = pot, 0
            return TeleopCommand(self.oracle.read().action, [], takeover=True)
        return TeleopCommand(None, [], takeover=False)
