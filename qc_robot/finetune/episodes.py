"""From journal records to whole episodes for the flat chunk replay (learner side, numpy only).

Several drivers feed one learner, so their transitions interleave in the journal. The replay is a
flat store in which an episode is a run of rows ending with ``terminals = 1`` and a sampled chunk
may span consecutive rows: rows of two robots must never alternate there. The assembler therefore
keeps each driver session's open episode apart and releases it whole when it ends (a terminal or
truncated row), when that session starts another episode, when its step numbers go back (a
restarted driver numbering from 0 again: the cut episode is released as truncated, never glued to
the new one), or when the session has been silent for ``orphan_records`` records (a driver that
vanished: released as truncated).

Rewards come from the driver (its task or a success key) unless a reward function is configured:
``module:function`` taking the :class:`~qc_robot.protocol.Transition` and returning rewards (K,),
or ``(rewards, terminals)`` to redefine true termination as well.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.protocol import Transition

RewardFn = Callable[[Transition], Any]
FIELDS = ("obs", "actions", "rewards", "terminated", "truncated", "next_obs", "intervention")


def load_reward_fn(ref: str) -> RewardFn | None:
    """``'pkg.module:function'`` → the function ('' → None)."""
    if not ref:
        return None
    module, sep, name = ref.partition(":")
    if not sep or not name:
        raise ValueError(f"reward_fn must look like 'module:function', got {ref!r}")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"reward_fn {ref!r} is not callable")
    return fn


def success_reward(tr: Transition) -> tuple[np.ndarray, np.ndarray]:
    """Sparse reward from the success signal: 0 on the step the episode succeeds (and it ends
    there), -1 before. For a real robot whose driver reports success (sensor or key press)."""
    k = len(tr.actions)
    rewards = np.full(k, -1.0, np.float32)
    terminals = tr.terminals.astype(bool).copy()
    if tr.success:
        rewards[-1], terminals[-1] = 0.0, True
    return rewards, terminals


def flatten_obs(obs: dict[str, np.ndarray], keys: list[str], k: int) -> np.ndarray:
    """(K, O) float32: the agent's flat observation, keys concatenated in the policy's order."""
    missing = [key for key in keys if key not in obs]
    if missing:
        raise ValueError(f"transition lacks observation keys {missing}")
    if not keys:  # an images-only policy
        return np.zeros((k, 0), np.float32)
    return np.concatenate([np.asarray(obs[key], np.float32).reshape(k, -1) for key in keys], axis=1)  # (K, O)


def image_rows(obs: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], k: int,
               where: str) -> dict[str, np.ndarray]:
    """``{f'{where}/{key}': (K, H, W, C) uint8}`` for each image key, checked (never cast)."""
    out = {}
    for key, shape in shapes.items():
        if key not in obs:
            raise ValueError(f"transition lacks image {key!r}")
        v = np.asarray(obs[key])
        if v.dtype != np.uint8 or v.shape != (k, *shape):
            raise ValueError(f"image {key!r} must be uint8 {(k, *shape)}, got {v.dtype} {v.shape}")
        out[f"{where}/{key}"] = v
    return out


@dataclass
class _Open:
    episode_id: int
    last_seq: int
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    success: bool = False
    policy_versions: set[str] = field(default_factory=set)
    next_step: int = 0
    """The step the episode's next record starts at; one that starts earlier is another episode."""


@dataclass
class Episode:
    """A finished episode: row arrays (n, ...) in FIELDS, plus what the driver reported."""

    session: str
    episode_id: int
    rows: dict[str, np.ndarray]
    success: bool
    policy_versions: list[str]

    @property
    def length(self) -> int:
        return len(self.rows["rewards"])


class EpisodeAssembler:
    """Collects each session's steps; ``add`` returns the episodes that this record finished."""

    def __init__(self, obs_keys: list[str], obs_dim: int, reward_fn: RewardFn | None = None,
                 orphan_records: int = 5_000, image_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        """``image_shapes``: image keys (of ``obs_keys``) → (H, W, C); their rows are kept as uint8
        under ``images/<key>`` and ``next_images/<key>`` (the replay's names), not flattened."""
        self.image_shapes = {k: tuple(v) for k, v in (image_shapes or {}).items()}
        self.obs_keys = [k for k in obs_keys if k not in self.image_shapes]
        self.obs_dim = obs_dim
        self.reward_fn, self.orphan_records = reward_fn, orphan_records
        self.fields = FIELDS + tuple(f"{g}/{k}" for g in ("images", "next_images") for k in self.image_shapes)
        """The row arrays of an episode: :data:`FIELDS`, then the image rows."""
        self._open: dict[str, _Open] = {}

    @property
    def pending_steps(self) -> int:
        return sum(len(p["rewards"]) for ep in self._open.values() for p in ep.parts)

    def add(self, seq: int, session: str, policy_version: str, tr: Transition) -> list[Episode]:
        """Take one record's K steps; raises ValueError on a malformed one (nothing is kept then)."""
        part = self._rows(tr)
        done: list[Episode] = []
        ep = self._open.get(session)
        if ep is not None and (ep.episode_id != tr.episode_id or tr.start_step < ep.next_step):
            done.append(self._close(session, truncate=True))  # the driver moved on (or restarted) without an end row
        ep = self._open.setdefault(session, _Open(tr.episode_id, seq))
        ep.last_seq, ep.next_step = seq, tr.start_step + len(part["rewards"])
        ep.success = ep.success or tr.success
        if policy_version:
            ep.policy_versions.add(policy_version)
        ends = np.flatnonzero(part["terminated"] | part["truncated"])
        if len(ends) and ends[0] < len(part["rewards"]) - 1:  # an end mid-record: keep what precedes it
            part = {k: v[: ends[0] + 1] for k, v in part.items()}
        ep.parts.append(part)
        if len(ends):
            done.append(self._close(session, truncate=False))
        for other in [s for s, e in self._open.items() if seq - e.last_seq > self.orphan_records]:
            done.append(self._close(other, truncate=True))
        return done

    def open_part(self, session: str) -> dict[str, np.ndarray] | None:
        """The newest rows of ``session``'s open episode (None when it has none open)."""
        ep = self._open.get(session)
        return ep.parts[-1] if ep is not None and ep.parts else None

    def open_rows(self) -> dict[str, dict[str, np.ndarray]]:
        """Every open episode's rows so far, by session."""
        return {s: {k: np.concatenate([p[k] for p in ep.parts]) for k in self.fields}
                for s, ep in self._open.items() if ep.parts}

    def _rows(self, tr: Transition) -> dict[str, np.ndarray]:
        k = len(tr.actions)
        rewards, terminated = tr.rewards, tr.terminals
        if self.reward_fn is not None:
            out = self.reward_fn(tr)
            rewards, terminated = out if isinstance(out, tuple) else (out, terminated)
        rewards = np.asarray(rewards, np.float32).reshape(-1)
        terminated = np.asarray(terminated, bool).reshape(-1)
        if rewards.shape != (k,) or terminated.shape != (k,):
            raise ValueError(f"rewards/terminals must have {k} entries, got {rewards.shape}/{terminated.shape}")
        obs, next_obs = flatten_obs(tr.obs, self.obs_keys, k), flatten_obs(tr.next_obs, self.obs_keys, k)
        if obs.shape[1] != self.obs_dim:
            raise ValueError(f"observations flatten to {obs.shape[1]} values, the agent reads {self.obs_dim}")
        interv = np.zeros(k, bool) if tr.intervention is None else np.asarray(tr.intervention, bool)
        rows = {"obs": obs, "actions": np.asarray(tr.actions, np.float32), "rewards": rewards,
                "terminated": terminated, "truncated": np.asarray(tr.truncated, bool), "next_obs": next_obs,
                "intervention": interv}
        if self.image_shapes:
            rows.update(image_rows(tr.obs, self.image_shapes, k, "images"))
            rows.update(image_rows(tr.next_obs, self.image_shapes, k, "next_images"))
        return rows

    def _close(self, session: str, truncate: bool) -> Episode:
        ep = self._open.pop(session)
        rows = {k: np.concatenate([p[k] for p in ep.parts]) for k in self.fields}
        if truncate and not (rows["terminated"][-1] or rows["truncated"][-1]):
            rows["truncated"][-1] = True  # the episode ends here in the replay
        return Episode(session, ep.episode_id, rows, ep.success, sorted(ep.policy_versions))

    def state_dict(self) -> dict[str, Any]:
        return {s: {"episode_id": e.episode_id, "last_seq": e.last_seq, "parts": e.parts, "success": e.success,
                    "policy_versions": sorted(e.policy_versions), "next_step": e.next_step}
                for s, e in self._open.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._open = {s: _Open(d["episode_id"], d["last_seq"], list(d["parts"]), d["success"],
                               set(d["policy_versions"]), d.get("next_step", 0)) for s, d in state.items()}


def intervention_segments(intervention: np.ndarray, horizon: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges for the intervention buffer: each run of operator steps, extended
    by horizon - 1 rows (within the episode) so a chunk starting at any operator step is whole."""
    n = len(intervention)
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if not intervention[i]:
            i += 1
            continue
        j = i
        while j < n and intervention[j]:
            j += 1
        stop = min(n, j + horizon - 1)
        if out and i <= out[-1][1]:
            out[-1] = (out[-1][0], stop)  # overlapping extensions merge
        else:
            out.append((i, stop))
        i = j
    return out
