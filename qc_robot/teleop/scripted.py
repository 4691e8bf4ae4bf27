"""A scripted operator: OGBench's cube oracles behind the teleop device interface.

It drives the same session path as a human (start, actions, verdict keys), so tests and sim
demos exercise real recording. The oracles were written for OGBench's ``data_collection`` mode,
where the env's info names a target block and its target pose; the evaluation (singletask) env
has no such keys, so we supply them from the task goal (``cur_task_info['goal_xyzs']``, yaw 0,
as the task env places its goal markers): the target is the first cube not yet within 0.04 m of
its goal, the env's own success radius. When the oracle finishes a block, the next one follows.

The oracle reads the simulator state directly, so use it with the lockstep sim driver (with the
realtime driver it reads state while the robot thread steps it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qc_robot.teleop.devices import Event, TeleopCommand, TeleopDevice

SUCCESS_RADIUS = 0.04
OUTCOMES = ("auto", "success", "failure", "discard")


class ScriptedOperator(TeleopDevice):
    """Oracle actions plus a script of verdicts, one per episode.

    ``outcomes[i]`` decides episode i: ``'auto'`` lets the episode run until the env ends it
    (success terminates it; the time limit truncates it), ``'success'``/``'failure'``/
    ``'discard'`` press that key after ``end_after`` steps. A discarded episode is re-recorded
    and consumes its outcome. After the script runs out the operator presses quit; with an empty
    script every episode is ``'auto'`` and the session's episode count ends the run.
    """

    name = "scripted"

    def __init__(self, env: Callable[[], Any], oracle: str = "plan", noise: float = 0.0, seed: int = 0,
                 outcomes: list[str] | None = None, end_after: int = 20) -> None:
        bad = [o for o in outcomes or [] if o not in OUTCOMES]
        if bad:
            raise ValueError(f"unknown scripted outcomes {bad}; use {OUTCOMES}")
        if oracle not in ("plan", "markov"):
            raise ValueError(f"oracle must be 'plan' or 'markov', got {oracle!r}")
        self._env_fn, self.kind, self.noise = env, oracle, noise
        self.outcomes = list(outcomes or [])
        self.end_after = end_after
        self._rng = np.random.default_rng(seed)
        self._scripted = bool(self.outcomes)
        self._episode = -1
        self._active = False
        self._steps = 0
        self._oracle: Any = None
        self._target = -1

    # -- the oracle ----------------------------------------------------------------------------
    def _env(self) -> Any:
        env = self._env_fn()
        if env is None:
            raise RuntimeError("scripted operator: the sim driver is not connected")
        return env.unwrapped

    def _info(self, env: Any) -> dict[str, Any]:
        info = env.compute_ob_info()
        goals = np.asarray(env.cur_task_info["goal_xyzs"])  # (num_cubes, 3)
        unsolved = [i for i in range(len(goals))
                    if np.linalg.norm(info[f"privileged/block_{i}_pos"] - goals[i]) > SUCCESS_RADIUS]
        if self._target not in unsolved or self._oracle.done:
            new = unsolved[0] if unsolved else max(self._target, 0)
            retarget = new != self._target or self._oracle.done
            self._target = new
            info.update(self._target_info(goals))
            if retarget:
                self._reset_oracle(info)
        info.update(self._target_info(goals))
        return info

    def _target_info(self, goals: np.ndarray) -> dict[str, Any]:
        return {"privileged/target_task": "cube", "privileged/target_block": self._target,
                "privileged/target_block_pos": goals[self._target].copy(),
                "privileged/target_block_yaw": np.zeros(1)}

    def _reset_oracle(self, info: Mapping[str, Any]) -> None:
        # OGBench oracles draw from the global numpy RNG: seed it from ours, restore the caller's.
        state = np.random.get_state()
        np.random.seed(int(self._rng.integers(2**31)))
        try:
            self._oracle.reset(None, info)
        finally:
            np.random.set_state(state)

    def _make_oracle(self, env: Any) -> Any:
        if not hasattr(env, "cur_task_info") or "goal_xyzs" not in env.cur_task_info:
            raise NotImplementedError("the scripted operator supports the cube tasks only")
        if self.kind == "plan":
            from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle

            return CubePlanOracle(env=env, noise=self.noise, noise_smoothing=0.5)
        from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle

        return CubeMarkovOracle(env=env)

    # -- the device ----------------------------------------------------------------------------
    def episode_started(self, obs: Mapping[str, np.ndarray]) -> None:
        env = self._env()
        if self._oracle is None:
            self._oracle = self._make_oracle(env)
        self._episode += 1
        self._active, self._steps, self._target = True, 0, -1
        self._oracle._done = True  # force a fresh plan for the first target
        self._info(env)

    def episode_ended(self) -> None:
        self._active = False

    def replan(self) -> None:
        """Plan afresh from the current state at the next read (after someone else moved the arm)."""
        if self._oracle is not None:
            self._oracle._done = True
            self._target = -1

    @property
    def outcome(self) -> str:
        return self.outcomes[self._episode] if 0 <= self._episode < len(self.outcomes) else "auto"

    def read(self) -> TeleopCommand:
        if not self._active:
            if self._scripted and self._episode + 1 >= len(self.outcomes):
                return TeleopCommand(None, [Event.QUIT])
            return TeleopCommand(None, [Event.START])
        events: list[Event] = []
        if self.outcome != "auto" and self._steps >= self.end_after:
            events.append(Event(self.outcome))
        env = self._env()
        info = self._info(env)
        action = np.clip(np.asarray(self._oracle.select_action(None, info), np.float32), -1.0, 1.0)
        self._steps += 1
        return TeleopCommand(action, events)

    def help(self) -> str:
        return f"scripted operator: OGBench cube {self.kind} oracle, outcomes {self.outcomes or 'auto'}"
