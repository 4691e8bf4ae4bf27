"""Scripted policies for bring-up and tests: hold still, replay logged actions, random actions.

They implement the ``Policy`` protocol exactly like an exported ONNX policy, so a server, a
driver and the safety layer can be brought up before any model is trained.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qc_robot.policies.base import ChunkResult, ObsField, PolicySpec


def simple_spec(obs_dim: int, action_dim: int, chunk_len: int, control_hz: float = 20.0,
                key: str = "state", actor_type: str = "scripted", version: str = "0") -> PolicySpec:
    """A spec with one float observation vector ``key`` and actions in [-1, 1]."""
    return PolicySpec([ObsField(key, (obs_dim,), "float32")], action_dim, chunk_len, control_hz,
                      actor_type=actor_type, version=version)


class HoldPolicy:
    """Always the same action (zeros by default: 'hold position' for delta control)."""

    def __init__(self, spec: PolicySpec, hold: Any = None) -> None:
        self.spec = spec
        a = np.zeros(spec.action_dim, np.float32) if hold is None else np.asarray(hold, np.float32)
        self._chunk = np.tile(np.clip(a, spec.action_low, spec.action_high), (spec.chunk_len, 1))  # (H, A)

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        t = time.perf_counter()
        return ChunkResult(self._chunk.copy(), time.perf_counter() - t)


class RandomPolicy:
    """Uniform random actions within the limits, from a seeded generator."""

    def __init__(self, spec: PolicySpec, seed: int = 0, scale: float = 1.0) -> None:
        self.spec = spec
        self._rng = np.random.default_rng(seed)
        mid = (spec.action_high + spec.action_low) / 2
        half = (spec.action_high - spec.action_low) / 2 * scale
        self._low, self._high = mid - half, mid + half

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        t = time.perf_counter()
        a = self._rng.uniform(self._low, self._high, (self.spec.chunk_len, self.spec.action_dim))  # (H, A)
        return ChunkResult(a.astype(np.float32), time.perf_counter() - t)


class ReplayPolicy:
    """Replays a logged action sequence chunk by chunk, one chunk per call; zeros after the end.

    Stateful (a cursor), so it suits one driver at a time; :meth:`rewind` starts over.
    """

    def __init__(self, spec: PolicySpec, actions: np.ndarray) -> None:
        self.spec = spec
        self.actions = np.asarray(actions, np.float32).reshape(-1, spec.action_dim)  # (N, A)
        self._cursor = 0

    @classmethod
    def from_hdf5(cls, path: str, demo: str = "demo_0", chunk_len: int = 5,
                  control_hz: float = 20.0) -> ReplayPolicy:
        """Replay ``data/<demo>/actions`` of an episode file; the spec takes obs keys from the file."""
        import h5py  # only this constructor needs it

        with h5py.File(path, "r") as f:
            grp = f["data"][demo]
            actions = np.asarray(grp["actions"], np.float32)  # (N, A)
            fields = [ObsField(k, tuple(grp["obs"][k].shape[1:]), "float32") for k in sorted(grp["obs"])]
        spec = PolicySpec(fields, actions.shape[1], chunk_len, control_hz, actor_type="replay")
        return cls(spec, actions)

    def rewind(self) -> None:
        self._cursor = 0

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        t = time.perf_counter()
        h, a = self.spec.chunk_len, self.spec.action_dim
        chunk = np.zeros((h, a), np.float32)  # (H, A)
        part = self.actions[self._cursor : self._cursor + h]
        chunk[: len(part)] = part
        self._cursor += h
        return ChunkResult(chunk, time.perf_counter() - t)


def scripted_from_ref(ref: str, seed: int | None = None) -> HoldPolicy | RandomPolicy | None:
    """``hold:OBS:ACT:H[:HZ]`` or ``random:OBS:ACT:H[:HZ]`` → a policy; None for other refs.

    ``seed``: of the random policy's actions (None: 0, as before)."""
    kind, _, rest = ref.partition(":")
    if kind not in ("hold", "random") or not rest:
        return None
    try:
        nums = [float(x) for x in rest.split(":")]
        obs_dim, act_dim, h = (int(x) for x in nums[:3])
        hz = nums[3] if len(nums) > 3 else 20.0
    except ValueError:
        raise ValueError(f"bad scripted policy {ref!r}: expected {kind}:OBS_DIM:ACT_DIM:H[:HZ]") from None
    spec = simple_spec(obs_dim, act_dim, h, hz)
    return HoldPolicy(spec) if kind == "hold" else RandomPolicy(spec, seed=0 if seed is None else seed)
