"""A deterministic mock robot: a point that integrates velocity commands toward a goal.

First-class driver (no mujoco, lockstep, seeded), used for bring-up of the whole stack and by
the conformance tests. Observation ``state`` = [position (A), goal (A), zero padding to obs_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drivers.base import Driver, DriverSpec, StepInfo
from policies.base import ObsField


@dataclass
class MockConfig:
    action_dim: int = 5
    obs_dim: int = 0
    """0: 2·action_dim; larger values pad with zeros (to match a policy's obs size)."""
    control_hz: float = 20.0
    max_episode_steps: int = 100
    gain: float = 0.1
    """Position change per step for a unit command."""
    success_radius: float = 0.1
    seed: int = 0
    obs_key: str = "state"


class MockDriver(Driver):
    """position += gain · action each step; success when within ``success_radius`` of the goal."""

    name = "mock"
    realtime = False

    def __init__(self, cfg: MockConfig | None = None) -> None:
        self.cfg = cfg = cfg or MockConfig()
        a = cfg.action_dim
        self._obs_dim = max(cfg.obs_dim, 2 * a)
        self.spec = DriverSpec([ObsField(cfg.obs_key, (self._obs_dim,), "float32")], a, -np.ones(a), np.ones(a),
                               cfg.control_hz, cfg.max_episode_steps)
        self._rng = np.random.default_rng(cfg.seed)
        self._pos = np.zeros(a)
        self._goal = np.zeros(a)
        self._info = StepInfo()
        self._connected = False

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._pos = self._rng.uniform(-0.5, 0.5, self.spec.action_dim)
        self._goal = self._rng.uniform(-0.5, 0.5, self.spec.action_dim)
        self._info = StepInfo()
        return self.get_observation()

    def get_observation(self) -> dict[str, np.ndarray]:
        obs = np.zeros(self._obs_dim, np.float32)
        a = self.spec.action_dim
        obs[:a], obs[a : 2 * a] = self._pos, self._goal
        return {self.cfg.obs_key: obs}

    def _apply(self, action: np.ndarray) -> None:
        self._pos = self._pos + self.cfg.gain * action
        dist = float(np.linalg.norm(self._pos - self._goal))
        step = self._info.step + 1
        success = dist < self.cfg.success_radius
        limit = self.cfg.max_episode_steps
        self._info = StepInfo(reward=-dist, success=success, terminated=success,
                              truncated=bool(limit and step >= limit and not success), step=step)

    def step_info(self) -> StepInfo:
        return self._info
