"""The episode in progress, held back until the operator's verdict (``drive`` with an operator).

With an operator in the loop an episode's transitions may not leave the robot as they happen: a
discarded episode must never reach the server or the learner, and the verdict decides the last
step's reward and flags. So each executed step is staged here, and only a finished episode is
released, with its verdict, to the client (and its outbox).

Durable when given a file (``outbox_dir/stage.log``): each tick's steps are appended as one
checksummed frame before the next tick, so ``kill -9`` loses at most the step in flight. The next
``drive`` on the same directory releases the leftover episode, truncated at its last staged step
(:meth:`EpisodeStage.recover`). stdlib + numpy + the protocol only (the robot PC needs no torch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from qc_robot import protocol as P
from qc_robot.data.frames import pack_frame, read_frame

log = logging.getLogger("qc_robot.stage")
T = TypeVar("T")


def _merge(parts: list[P.Transition]) -> P.Transition:
    """Consecutive single-episode parts → one Transition of all their steps."""
    first = parts[0]
    cat = np.concatenate

    def opt(name: str) -> np.ndarray | None:
        vals = [getattr(p, name) for p in parts]
        return None if any(v is None for v in vals) else cat(vals)

    return P.Transition(
        episode_id=first.episode_id, start_step=first.start_step,
        obs={k: cat([p.obs[k] for p in parts]) for k in first.obs},
        actions=cat([p.actions for p in parts]), rewards=cat([p.rewards for p in parts]),
        terminals=cat([p.terminals for p in parts]), truncated=cat([p.truncated for p in parts]),
        next_obs={k: cat([p.next_obs[k] for p in parts]) for k in first.next_obs},
        success=parts[-1].success, policy_version=next((p.policy_version for p in parts if p.policy_version), ""),
        intervention=opt("intervention"), timestamps=opt("timestamps"), held=opt("held"), reward=first.reward)


def version_runs(items: list[T], version: Callable[[T], str]) -> list[list[T]]:
    """``items`` (steps or messages, in order) cut where the policy version that acted changes;
    those of no policy (holds, the operator: version '') stay in the run they fall in."""
    runs: list[list[T]] = []
    current = ""
    for it in items:
        v = version(it)
        if not runs or (v and current and v != current):
            runs.append([])
        current = v or current
        runs[-1].append(it)
    return runs


def _version_runs(parts: list[P.Transition]) -> list[P.Transition]:
    return [_merge(r) for r in version_runs(parts, lambda p: p.policy_version)]


def split_rows(tr: P.Transition, per: int) -> list[P.Transition]:
    """``tr`` cut into messages of at most ``per`` steps (the server's size limit)."""
    out = []
    k = len(tr.actions)
    for i in range(0, k, max(1, per)):
        s = slice(i, i + per)

        def cut(a: np.ndarray | None, s: slice = s) -> np.ndarray | None:
            return None if a is None else a[s]

        out.append(P.Transition(
            episode_id=tr.episode_id, start_step=tr.start_step + i, obs={k_: v[s] for k_, v in tr.obs.items()},
            actions=tr.actions[s], rewards=tr.rewards[s], terminals=tr.terminals[s], truncated=tr.truncated[s],
            next_obs={k_: v[s] for k_, v in tr.next_obs.items()},
            success=tr.success if i + per >= k else bool(tr.success and tr.terminals[s].any()),
            policy_version=tr.policy_version, intervention=cut(tr.intervention), timestamps=cut(tr.timestamps),
            held=cut(tr.held), reward=tr.reward))
    return out


class EpisodeStage:
    """The staged steps of one episode (module docstring). ``path`` None: in memory only."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self._parts: list[P.Transition] = []
        self._file: BinaryIO | None = None

    @property
    def steps(self) -> int:
        return sum(len(p.actions) for p in self._parts)

    def add(self, part: P.Transition) -> None:
        """Stage one tick's steps (flushed to disk before returning, when durable)."""
        self._parts.append(part)
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("ab")
            self._file.write(pack_frame(P.encode(part)))
            self._file.flush()

    def take(self) -> list[P.Transition]:
        """The whole staged episode, one Transition per run of one policy version ([] if empty);
        the stage is cleared."""
        parts, self._parts = self._parts, []
        self._clear_file()
        return _version_runs(parts)

    def discard(self) -> int:
        """Drop the staged episode; returns the steps dropped."""
        n = self.steps
        self._parts = []
        self._clear_file()
        return n

    def recover(self) -> list[P.Transition]:
        """A previous process's unfinished episode (from the file), truncated at its last staged
        step, one Transition per run of one policy version ([] if none). The file is cleared once read."""
        if self.path is None or not self.path.exists():
            return []
        parts: list[P.Transition] = []
        with self.path.open("rb") as f:
            while (payload := read_frame(f, 1 << 30)) is not None:
                try:
                    msg = P.decode(payload)
                except Exception as e:  # a frame that passed its checksum but not the codec
                    log.error("stage %s: undecodable frame dropped with what follows: %s", self.path, e)
                    break
                if isinstance(msg, P.Transition):
                    parts.append(msg)
        self._clear_file()
        if not parts:
            return []
        runs = _version_runs([p for p in parts if p.episode_id == parts[0].episode_id])
        last = runs[-1]
        if not (last.terminals[-1] or last.truncated[-1]):
            last.truncated[-1] = True  # the episode was cut here by the dead process
        return runs

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _clear_file(self) -> None:
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
