"""A per-step, append-only journal of the episode being recorded: what survives a kill -9.

HDF5 is not crash-safe while it is being written (a kill inside a write can leave links that point
past the end of the file), so steps never go to the HDF5 file directly. Each step is appended
here as one frame and handed to the OS before the next control tick::

    file   = MAGIC (8 bytes) | frame*
    frame  = u32 LE payload length | u32 LE crc32(payload) | payload (msgpack map)

Frames: ``begin`` (uuid, env_args, episode attrs, first observation), one ``step`` per executed
action (applied action, reward, flags, the observation after it), and ``end`` (the operator's
label) written just before the episode is committed to HDF5. A reader stops at the first frame
whose length runs past the end of the file or whose checksum fails: a torn tail (the frame in
flight when the process died) is dropped, everything before it is kept.

Arrays use the protocol's typed ndarray extension (no pickle); numpy and msgpack only.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from qc_robot.data.frames import pack_frame, read_frame
from qc_robot.data.rewards import FROM_VERDICT, reward_source, verdict_rewards
from qc_robot.protocol import ARRAY_EXT, pack_array, unpack_array

MAGIC = b"QCJRNL01"
MAX_FRAME_BYTES = 256 << 20


class JournalError(ValueError):
    """The journal file is not a journal (bad magic) or has no readable ``begin`` frame."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot journal {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise ValueError(f"unknown msgpack ext type {code}")
    return unpack_array(data)


def encode_frame(payload: Mapping[str, Any]) -> bytes:
    """One length-prefixed, checksummed frame."""
    return pack_frame(msgpack.packb(dict(payload), default=_default, use_bin_type=True))


@dataclass
class RecordedEpisode:
    """One episode as recorded: per-step lists plus its identity and attributes."""

    uuid: str
    env_args: dict[str, Any]
    attrs: dict[str, Any]
    obs: list[dict[str, np.ndarray]] = field(default_factory=list)
    """Observations o_0 .. o_N (one more than actions: the last is the final next observation)."""
    actions: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    dones: list[bool] = field(default_factory=list)
    label: str = ""
    """'success', 'failure' or '' (the episode never ended: recovered after a crash)."""

    def __len__(self) -> int:
        return len(self.actions)

    def add_step(self, action: np.ndarray, reward: float, done: bool, next_obs: Mapping[str, np.ndarray]) -> None:
        self.actions.append(np.asarray(action, np.float32))
        self.rewards.append(float(reward))
        self.dones.append(bool(done))
        self.obs.append({k: np.asarray(v) for k, v in next_obs.items()})

    def writer_args(self) -> dict[str, Any]:
        """Keyword arguments for ``EpisodeWriter.add_episode`` (needs at least one step)."""
        keys = list(self.obs[0])
        n = len(self.actions)
        stacked = {k: np.stack([o[k] for o in self.obs]) for k in keys}  # (N+1, ...)
        attrs = dict(self.attrs)
        attrs.update(uuid=self.uuid, label=self.label or "unlabelled", success=self.label == "success")
        rewards, dones = np.asarray(self.rewards, np.float32), np.asarray(self.dones, np.float32)
        verdict = verdict_rewards(self.label, n) if reward_source(self.env_args) == FROM_VERDICT else None
        if verdict is not None:  # a robot reports no reward: the file holds what the loader derives anyway
            rewards, dones = verdict
        return dict(obs={k: v[:n] for k, v in stacked.items()}, next_obs={k: v[1:] for k, v in stacked.items()},
                    actions=np.stack(self.actions).astype(np.float32),  # (N, A)
                    rewards=rewards, dones=dones, attrs=attrs)


class JournalWriter:
    """Append frames for one episode; each frame reaches the OS before ``step`` returns.

    ``fsync=True`` also forces it to the disk (survives power loss, costs a disk sync per step);
    a process crash or kill -9 loses nothing that ``write`` returned for, either way.
    """

    def __init__(self, path: str, episode: RecordedEpisode, fsync: bool = False) -> None:
        self.path, self.fsync, self.episode = path, fsync, episode
        # O_EXCL: a leftover journal is unrecovered data and must never be overwritten.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._write(MAGIC + encode_frame({"kind": "begin", "uuid": episode.uuid, "env_args": episode.env_args,
                                          "attrs": episode.attrs, "obs": episode.obs[0]}))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked; a frame must go out whole
            view = view[os.write(self._fd, view):]
        if self.fsync:
            os.fsync(self._fd)

    def step(self, action: np.ndarray, reward: float, done: bool, next_obs: Mapping[str, np.ndarray]) -> None:
        """Record one executed step (in memory and in the journal)."""
        self.episode.add_step(action, reward, done, next_obs)
        self._write(encode_frame({"kind": "step", "action": self.episode.actions[-1], "reward": float(reward),
                                  "done": bool(done), "obs": self.episode.obs[-1], "t": time.time()}))

    def end(self, label: str, attrs: Mapping[str, Any] | None = None) -> None:
        """The operator's verdict: after this frame, recovery restores a fully labelled episode."""
        self.episode.label = label
        self.episode.attrs.update(attrs or {})
        self._write(encode_frame({"kind": "end", "label": label, "attrs": dict(attrs or {})}))
        os.fsync(self._fd)  # once per episode: the label is worth a disk sync

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close and delete the journal (operator discarded the episode, or it was committed)."""
        self.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def new_episode(env_args: Mapping[str, Any], attrs: Mapping[str, Any], first_obs: Mapping[str, np.ndarray]) -> RecordedEpisode:
    """A fresh episode with a random uuid (the key that makes recovery idempotent)."""
    return RecordedEpisode(uuid=uuid.uuid4().hex, env_args=dict(env_args), attrs=dict(attrs),
                           obs=[{k: np.asarray(v) for k, v in first_obs.items()}])


@dataclass
class JournalReadout:
    episode: RecordedEpisode
    frames: int
    torn_bytes: int
    """Bytes after the last good frame (a torn tail: the frame in flight at the crash)."""


def read_journal(path: str) -> JournalReadout:
    """Rebuild the episode in ``path``, dropping a torn or corrupt tail."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise JournalError(f"{path}: not a qc-robot journal (bad magic)")
        size = os.fstat(f.fileno()).st_size
        off, frames, ep = len(MAGIC), 0, None
        while (body := read_frame(f, MAX_FRAME_BYTES)) is not None:
            try:
                frame = msgpack.unpackb(body, raw=False, ext_hook=_ext_hook, strict_map_key=False)
            except (ValueError, msgpack.UnpackException):
                break
            kind = frame.get("kind")
            if kind == "begin" and ep is None:
                ep = RecordedEpisode(uuid=frame["uuid"], env_args=frame["env_args"], attrs=frame["attrs"],
                                     obs=[frame["obs"]])
            elif kind == "step" and ep is not None:
                ep.add_step(frame["action"], frame["reward"], frame["done"], frame["obs"])
            elif kind == "end" and ep is not None:
                ep.label = frame["label"]
                ep.attrs.update(frame["attrs"])
            else:
                break
            off = f.tell()
            frames += 1
    if ep is None:
        raise JournalError(f"{path}: no readable 'begin' frame (the crash came before the first step)")
    return JournalReadout(ep, frames, size - off)
