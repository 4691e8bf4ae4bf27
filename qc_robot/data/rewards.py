"""Reward transforms shared by the sim env wrapper and the dataset loader (numpy only)."""

from __future__ import annotations

import numpy as np


def sparsify(rewards: np.ndarray | float) -> np.ndarray:
    """The paper's sparse reward for scene and puzzle: 0 where the task reward is 0 (success),
    else -1."""
    r = np.asarray(rewards, dtype=np.float32)
    return np.where(r == 0.0, 0.0, -1.0).astype(np.float32)
