"""The policy interface the control server runs: observation dict in, action chunk out.

Torch-free: a robot PC imports this with numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ObsField:
    """One named observation array: its key, shape (without batch) and dtype name."""

    key: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class PolicySpec:
    """What a policy consumes and produces; exported into the ONNX metadata and the handshake."""

    obs_fields: list[ObsField]
    action_dim: int
    chunk_len: int
    """Actions per chunk (H)."""
    control_hz: float
    action_low: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """(A,) lowest action in robot units; every served action is clipped to [low, high]."""
    action_high: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    actor_type: str = "scripted"
    version: str = "0"
    """Policy version, reported with every chunk."""

    def __post_init__(self) -> None:
        if len(self.action_low) == 0:
            self.action_low = -np.ones(self.action_dim, np.float32)
        if len(self.action_high) == 0:
            self.action_high = np.ones(self.action_dim, np.float32)
        self.action_low = np.asarray(self.action_low, np.float32).reshape(self.action_dim)
        self.action_high = np.asarray(self.action_high, np.float32).reshape(self.action_dim)


@dataclass
class ChunkResult:
    actions: np.ndarray
    """(H, A) float32 in robot units, within the spec's limits."""
    infer_s: float
    """Seconds spent computing the chunk (inference only, device time included)."""


@runtime_checkable
class Policy(Protocol):
    spec: PolicySpec

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        """One chunk for one (unbatched) observation; raises ValueError on a bad observation."""
        ...
