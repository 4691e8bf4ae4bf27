"""Crash-safe episode logging of what the server serves: Transition messages → HDF5 episode files.

Drivers stream ``Transition`` messages (obs, applied action, reward, flags). What a kill -9 at
any moment leaves behind, and how each piece is made safe:

* **open episodes**: every accepted transition is appended, on the socket loop and before the
  next message is read, to ``<log_dir>/open/<uuid>.qcep`` (checksummed frames, ``os.write``: in
  the OS at once). A kill loses at most the frame being written, i.e. the step in flight. Nothing
  of an open episode is held in memory, so a driver that never ends its episode costs disk only.
* **finished episodes** (terminal or truncated row, a new episode id from the same session, the
  session ending, server stop) are read back from their journals and committed to the run's
  HDF5 file on a writer thread, the teleop recorder's way: copy to ``<file>.commit.tmp``, append,
  fsync, ``os.replace`` (the commit point), and only then delete the journals. Episodes that
  finished meanwhile are committed together (one copy per batch, so a flood of short episodes
  costs one copy per batch, not per episode), and a new file is started past ``rotate_bytes``.
  The HDF5 file is therefore always a complete older or newer version.
* **recovery**: a new logger on the same ``log_dir`` commits every leftover journal into the
  file it was meant for (attr ``recovered=True``); each episode carries a ``uuid`` attr, so a kill
  between the replace and the unlink never adds an episode twice.

Journal file: ``MAGIC | frame*``, frame = ``u32 LE len | u32 LE crc32 | payload``; the first
payload is a msgpack header map, each further one an encoded (already validated) Transition.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from qc_robot import protocol as P
from qc_robot.data.frames import pack_frame, read_frame
from qc_robot.data.recorder import complete_uuids
from qc_robot.server.ratelog import RateLimitedLog

log = logging.getLogger("qc_robot.server")
MAGIC = b"QCEPLOG1"
MAX_FRAME_BYTES = P.MAX_MESSAGE_BYTES + (1 << 20)
MAX_BATCH = 256
"""Episodes committed with one copy of the file at most."""


@dataclass
class _Open:
    """An open episode: its journal's file descriptor and where it goes (no steps in memory)."""

    fd: int
    journal: str
    steps: int = 0


@dataclass
class JournaledEpisode:
    """An episode read back from its journal (torn tail dropped)."""

    header: dict[str, Any]
    parts: list[P.Transition] = field(default_factory=list)

    @property
    def uuid(self) -> str:
        return str(self.header["uuid"])


@dataclass
class _Commit:
    journal: str
    recovered: bool = False


class EpisodeLogger:
    """Journals validated transitions per (session, episode) and commits finished episodes.

    ``add``/``end_session`` run on the server's socket loop (one thread); the HDF5 work runs on
    the logger's own writer thread, so I/O never stalls the loop beyond one small file append."""

    def __init__(self, log_dir: str, env_args: dict[str, Any], rotate_bytes: int = 256 << 20,
                 min_commit_interval_s: float = 0.5) -> None:
        self.dir = Path(log_dir)
        self.open_dir = self.dir / "open"
        self.open_dir.mkdir(parents=True, exist_ok=True)
        self.rotate_bytes = rotate_bytes
        self.min_commit_interval_s = min_commit_interval_s
        """Commits (and their file copies) happen at most this often; episodes wait in a batch."""
        self._last_commit = 0.0
        self._stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self._part = 0
        self.path = self._file_name()
        self._env_args = dict(env_args)
        self._open: dict[tuple[str, int], _Open] = {}
        self._queue: queue.Queue[_Commit | None] = queue.Queue()
        self.episodes_written = 0
        self.episodes_recovered = 0
        self.failures = 0
        self._log = RateLimitedLog(log)
        self.failure: BaseException | None = None
        """Set when the writer thread died (the server then stops with a non-zero exit)."""
        for journal in sorted(self.open_dir.glob("*.qcep")):
            self._queue.put(_Commit(str(journal), recovered=True))
        self._thread = threading.Thread(target=self._guarded_write_loop, name="episode-log", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _file_name(self) -> str:
        suffix = f"-{self._part}" if self._part else ""
        return str(self.dir / f"serve-{self._stamp}{suffix}.hdf5")

    # -- socket-loop side ----------------------------------------------------------------------

    def add(self, session: str, driver: str, tr: P.Transition, calibration_id: str = "") -> None:
        """Journal K validated steps (``checks.check_transition``); closes the episode if its last
        row ends it. Raises OSError if the journal cannot be written (the caller reports it)."""
        for key in [key for key in self._open if key[0] == session and key[1] != tr.episode_id]:
            self._close(key)  # the driver moved on to a new episode
        key = (session, tr.episode_id)
        ep = self._open.get(key)
        if ep is None:
            ep = self._begin(session, driver, tr.episode_id, calibration_id)
        _write_all(ep.fd, pack_frame(P.encode(tr)))  # in the OS before the next message is read
        ep.steps += len(tr.actions)
        if bool(tr.terminals[-1]) or bool(tr.truncated[-1]):
            self._close(key)

    def _begin(self, session: str, driver: str, episode_id: int, calibration_id: str) -> _Open:
        uid = uuid.uuid4().hex
        path = str(self.open_dir / f"{uid}.qcep")
        # O_EXCL: a journal is unrecovered data and must never be overwritten
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        header = {"uuid": uid, "session": session, "driver": driver, "episode_id": episode_id,
                  "calibration_id": calibration_id, "out": self.path, "env_args": self._env_args}
        _write_all(fd, MAGIC + pack_frame(msgpack.packb(header, use_bin_type=True)))
        ep = self._open[(session, episode_id)] = _Open(fd, path)
        return ep

    def open_episodes(self) -> int:
        """Episodes being journaled (at most one per session)."""
        return len(self._open)

    def end_session(self, session: str) -> None:
        for key in [k for k in self._open if k[0] == session]:
            self._close(key)

    def close(self, timeout: float = 30.0) -> None:
        """Commit every open episode and stop the writer thread."""
        for key in list(self._open):
            self._close(key)
        self._queue.put(None)
        self._thread.join(timeout)

    def _close(self, key: tuple[str, int]) -> None:
        ep = self._open.pop(key, None)
        if ep is not None:
            os.close(ep.fd)
            self._queue.put(_Commit(ep.journal))

    # -- writer thread -------------------------------------------------------------------------

    def _guarded_write_loop(self) -> None:
        try:
            self._write_loop()
        except BaseException as e:  # per-batch errors are caught inside: this is a bug
            self.failure = e
            log.critical("episode logger thread died", exc_info=True)

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is not None and self.min_commit_interval_s > 0:
                # pace commits: under a flood of short episodes, batch them instead of contending
                # with the socket loop for the GIL once per episode
                time.sleep(max(0.0, self._last_commit + self.min_commit_interval_s - time.monotonic()))
            batch: list[_Commit] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is None
            if batch:
                self._commit_batch(batch)
                self._last_commit = time.monotonic()

    def _commit_batch(self, batch: list[_Commit]) -> None:
        """Read the batch's journals and commit them, one atomic copy per target file."""
        groups: dict[str, list[tuple[_Commit, JournaledEpisode]]] = {}
        for item in batch:
            try:
                ep = read_episode_journal(item.journal)
            except Exception as e:  # noqa: BLE001 - one unreadable journal must not stop the others
                log.error("episode journal %s is unreadable (%s): moved aside", item.journal, e)
                with contextlib.suppress(OSError):
                    os.replace(item.journal, item.journal + ".corrupt")
                continue
            if ep is None:
                os.unlink(item.journal)  # killed before its first step was out: nothing to recover
                continue
            out = str(ep.header.get("out", "")) if item.recovered else self._current_file()
            groups.setdefault(out or self._current_file(), []).append((item, ep))
        for out, items in groups.items():
            try:
                names = self._commit(out, items)
            except Exception:  # the journals stay: a later logger on this log_dir retries them
                self.failures += 1
                log.exception("could not log %d episode(s) to %s (journals kept)", len(items), out)
                continue
            for (item, ep), name in zip(items, names, strict=True):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(item.journal)  # only now: the episode is in the file
                if name:
                    self._log.info("episode", "logged episode %s (%d steps%s) to %s as %s", ep.header.get("episode_id"),
                                   sum(len(p.actions) for p in ep.parts), ", recovered" if item.recovered else "",
                                   out, name)

    def _current_file(self) -> str:
        if os.path.exists(self.path) and os.path.getsize(self.path) > self.rotate_bytes:
            self._part += 1
            self.path = self._file_name()
        return self.path

    def _commit(self, out: str, items: list[tuple[_Commit, JournaledEpisode]]) -> list[str]:
        from qc_robot.data.hdf5_io import EpisodeWriter  # h5py only when logging is on

        done = complete_uuids(out) if any(item.recovered for item, _ in items) else set()
        tmp = out + ".commit.tmp"
        exists = os.path.exists(out)
        if exists:
            shutil.copyfile(out, tmp)
        names: list[str] = []
        env_args = dict(items[0][1].header.get("env_args") or self._env_args)
        with EpisodeWriter(tmp, env_args, mode="a" if exists else "w") as writer:
            for item, ep in items:
                if ep.uuid in done:  # a kill between the replace and the unlink: already there
                    names.append("")
                    continue
                names.append(writer.add_episode(**_episode_arrays(ep, item.recovered)))
        _fsync(tmp)
        os.replace(tmp, out)  # the commit point
        _fsync(os.path.dirname(os.path.abspath(out)))
        for (item, _), name in zip(items, names, strict=True):
            if name and item.recovered:
                self.episodes_recovered += 1
            elif name:
                self.episodes_written += 1
        return names


def _episode_arrays(ep: JournaledEpisode, recovered: bool) -> dict[str, Any]:
    """``EpisodeWriter.add_episode`` arguments for one journaled episode."""
    cat, parts, h = np.concatenate, ep.parts, ep.header
    dones = cat([p.terminals for p in parts])
    missing, expect = 0, parts[0].start_step
    for p in parts:
        missing += max(0, p.start_step - expect)  # a refused transition leaves a gap
        expect = p.start_step + len(p.actions)
    attrs = {"uuid": ep.uuid, "session": h.get("session", ""), "driver": h.get("driver", ""),
             "episode_id": int(h.get("episode_id", -1)), "start_step": parts[0].start_step,
             "success": any(p.success for p in parts), "calibration_id": h.get("calibration_id", ""),
             "complete": bool(dones[-1] or parts[-1].truncated[-1]), "missing_steps": missing,
             "recovered": recovered, "reward": ",".join(dict.fromkeys(p.reward for p in parts if p.reward)),
             "policy_version": ",".join(dict.fromkeys(p.policy_version for p in parts if p.policy_version))}
    extras = {name: cat([getattr(p, name) for p in parts]) for name in ("timestamps", "held")
              if all(getattr(p, name) is not None for p in parts)}  # beside actions, when every part has them
    # every row says whether an operator acted (a part that does not say: the policy did)
    extras["intervention"] = cat([np.zeros(len(p.actions), bool) if p.intervention is None else p.intervention
                                  for p in parts])
    return dict(obs={k: cat([p.obs[k] for p in parts]) for k in parts[0].obs},
                actions=cat([p.actions for p in parts]), rewards=cat([p.rewards for p in parts]), dones=dones,
                next_obs={k: cat([p.next_obs[k] for p in parts]) for k in parts[0].next_obs}, attrs=attrs,
                extras=extras)


def read_episode_journal(path: str) -> JournaledEpisode | None:
    """The episode in an open-episode journal, dropping a torn or corrupt tail (None: no steps)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("bad magic: not a qc-robot episode journal")
        head = read_frame(f, MAX_FRAME_BYTES)
        if head is None:
            return None
        header = msgpack.unpackb(head, raw=False)
        if not isinstance(header, dict) or "uuid" not in header:
            raise ValueError("journal header is not a map with a uuid")
        ep = JournaledEpisode(header)
        while (body := read_frame(f, MAX_FRAME_BYTES)) is not None:
            try:
                tr = P.decode(body)
            except P.ProtocolError:
                break
            if not isinstance(tr, P.Transition):
                break
            ep.parts.append(tr)
    return ep if ep.parts else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may write less than asked; a frame must go out whole
        view = view[os.write(fd, view):]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
