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
    frozen: int = 0
    """Leading actions copied from the previous chunk (real-time chunking; 0 without a guide)."""


@dataclass
class ChunkGuide:
    """Real-time chunking input: the previous chunk's plan for the steps of the chunk to compute.

    ``actions[i]`` (robot units) is what the previous chunk planned for step ``start + i`` of the
    new chunk, for ``i < overlap``; rows from ``overlap`` on are unused. The first ``delay``
    steps will run from the previous chunk while the new one is computed: a guided policy
    returns them unchanged (frozen) and continues the rest of the plan smoothly.
    """

    actions: np.ndarray
    """(H, A) float32, zero past ``overlap``."""
    delay: int
    overlap: int

    @property
    def frozen(self) -> int:
        return max(0, min(self.delay, self.overlap))


def align_guide(prev_actions: np.ndarray, prev_start: int, start: int, delay: int) -> ChunkGuide | None:
    """The guide for a chunk starting at step ``start`` from the chunk that started at
    ``prev_start``: its remaining actions shifted to the new chunk's steps. None when nothing of
    it is left (or ``start`` precedes it)."""
    prev = np.asarray(prev_actions, np.float32)  # (H, A)
    shift = start - prev_start
    h = prev.shape[0]
    if shift < 0 or shift >= h:
        return None
    aligned = np.zeros_like(prev)
    aligned[: h - shift] = prev[shift:]
    return ChunkGuide(aligned, max(0, int(delay)), h - shift)


@runtime_checkable
class Policy(Protocol):
    spec: PolicySpec

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        """One chunk for one (unbatched) observation; raises ValueError on a bad observation.

        Policies that can continue a previous chunk (real-time chunking) set a true
        ``supports_guidance`` attribute and accept ``predict(obs, guide=ChunkGuide)``."""
        ...
