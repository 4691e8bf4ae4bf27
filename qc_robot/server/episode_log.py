"""Crash-safe episode logging of what the server serves: Transition messages → HDF5 episode files.

Drivers stream ``Transition`` messages (obs, applied action, reward, flags). What a kill -9 at
any moment leaves behind, and how each piece is made safe:

* **open episodes**: every accepted transition is appended, on the socket loop and before the
  next message is read, to ``<log_dir>/open/<uuid>.qcep`` (checksummed frames, ``os.write``: in
  the OS at once). A kill loses at most the frame being written, i.e. the step in flight.
* **finished episodes** (terminal or truncated row, a new episode id from the same session, the
  session ending, server stop) are committed to the run's HDF5 file on a writer thread, the
  teleop recorder's way: copy to ``<file>.commit.tmp``, append, fsync, ``os.replace`` (the
  commit point), and only then delete the journal. The HDF5 file is therefore always a complete
  older or newer version; a new file is started when it exceeds ``rotate_bytes`` so the copy stays
  cheap.
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

log = logging.getLogger("qc_robot.server")
MAGIC = b"QCEPLOG1"
MAX_FRAME_BYTES = P.MAX_MESSAGE_BYTES + (1 << 20)


@dataclass
class _OpenEpisode:
    uuid: str
    session: str
    driver: str
    episode_id: int
    out: str
    journal: str
    fd: int
    parts: list[P.Transition] = field(default_factory=list)
    success: bool = False
    calibration_id: str = ""
    missing_steps: int = 0
    """Steps skipped between accepted transitions (a refused transition leaves a gap)."""
    next_step: int = 0
    env_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Commit:
    ep: _OpenEpisode
    recovered: bool = False


class EpisodeLogger:
    """Collects validated transitions per (session, episode) and commits finished episodes.

    ``add``/``end_session`` run on the server's socket loop (one thread); the HDF5 work runs on
    the logger's own writer thread, so I/O never stalls the loop beyond one small file append."""

    def __init__(self, log_dir: str, env_args: dict[str, Any], rotate_bytes: int = 256 << 20) -> None:
        self.dir = Path(log_dir)
        self.open_dir = self.dir / "open"
        self.open_dir.mkdir(parents=True, exist_ok=True)
        self.rotate_bytes = rotate_bytes
        self._stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self._part = 0
        self.path = self._file_name()
        self._env_args = dict(env_args)
        self._open: dict[tuple[str, int], _OpenEpisode] = {}
        self._queue: queue.Queue[_Commit | None] = queue.Queue()
        self.episodes_written = 0
        self.episodes_recovered = 0
        self.failures = 0
        self.failure: BaseException | None = None
        """Set when the writer thread died (the server then stops with a non-zero exit)."""
        for journal in sorted(self.open_dir.glob("*.qcep")):
            self._queue_recovery(journal)
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
            ep = self._begin(session, driver, tr, calibration_id)
        _write_all(ep.fd, pack_frame(P.encode(tr)))  # in the OS before the next message is read
        if ep.parts and tr.start_step > ep.next_step:
            ep.missing_steps += tr.start_step - ep.next_step
        ep.parts.append(tr)
        ep.next_step = tr.start_step + len(tr.actions)
        ep.success = ep.success or tr.success
        if bool(tr.terminals[-1]) or bool(tr.truncated[-1]):
            self._close(key)

    def next_step(self, session: str, episode_id: int) -> int | None:
        """First step the open episode expects next (None: no such open episode)."""
        ep = self._open.get((session, episode_id))
        return ep.next_step if ep is not None else None

    def _begin(self, session: str, driver: str, tr: P.Transition, calibration_id: str) -> _OpenEpisode:
        uid = uuid.uuid4().hex
        path = str(self.open_dir / f"{uid}.qcep")
        # O_EXCL: a journal is unrecovered data and must never be overwritten
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        ep = _OpenEpisode(uid, session, driver, tr.episode_id, self.path, path, fd, calibration_id=calibration_id,
                          next_step=tr.start_step, env_args=self._env_args)
        header = {"uuid": uid, "session": session, "driver": driver, "episode_id": tr.episode_id,
                  "calibration_id": calibration_id, "out": self.path, "env_args": self._env_args}
        _write_all(fd, MAGIC + pack_frame(msgpack.packb(header, use_bin_type=True)))
        self._open[(session, tr.episode_id)] = ep
        return ep

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
        if ep is None:
            return
        os.close(ep.fd)
        ep.fd = -1
        self._queue.put(_Commit(ep))

    # -- recovery ------------------------------------------------------------------------------

    def _queue_recovery(self, journal: Path) -> None:
        try:
            ep = read_episode_journal(str(journal))
        except (OSError, ValueError) as e:
            log.error("episode journal %s is unreadable (%s): moved aside", journal.name, e)
            os.replace(journal, journal.with_suffix(".corrupt"))
            return
        if ep is None:
            journal.unlink()  # killed before its first step was out: nothing to recover
            return
        self._queue.put(_Commit(ep, recovered=True))

    # -- writer thread -------------------------------------------------------------------------

    def _guarded_write_loop(self) -> None:
        try:
            self._write_loop()
        except BaseException as e:  # the loop catches per-episode errors: this is a bug
            self.failure = e
            log.critical("episode logger thread died", exc_info=True)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            ep = item.ep
            try:
                name = self._commit(item)
            except Exception:  # one bad episode must not stop the logger; its journal stays
                self.failures += 1
                log.exception("could not log episode %s of session %s (journal kept: %s)", ep.episode_id,
                              ep.session, ep.journal)
                continue
            if name is not None:
                log.info("logged episode %s (%d steps%s) to %s as %s", ep.episode_id,
                         sum(len(p.actions) for p in ep.parts), ", recovered" if item.recovered else "",
                         ep.out, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.journal)  # only now: the episode is in the file

    def _commit(self, item: _Commit) -> str | None:
        from qc_robot.data.hdf5_io import EpisodeWriter  # h5py only when logging is on

        ep, parts = item.ep, item.ep.parts
        if not parts:
            return None
        out = ep.out
        if not item.recovered:
            if os.path.exists(self.path) and os.path.getsize(self.path) > self.rotate_bytes:
                self._part += 1
                self.path = self._file_name()
            out = self.path
        if item.recovered and ep.uuid in _uuids(out):
            return None  # a kill between the replace and the unlink: already there
        cat = np.concatenate
        dones = cat([p.terminals for p in parts])
        attrs = {"uuid": ep.uuid, "session": ep.session, "driver": ep.driver, "episode_id": ep.episode_id,
                 "start_step": parts[0].start_step, "success": ep.success, "calibration_id": ep.calibration_id,
                 "complete": bool(dones[-1] or parts[-1].truncated[-1]), "missing_steps": ep.missing_steps,
                 "recovered": item.recovered,
                 "policy_version": ",".join(dict.fromkeys(p.policy_version for p in parts if p.policy_version))}
        tmp = out + ".commit.tmp"
        exists = os.path.exists(out)
        if exists:
            shutil.copyfile(out, tmp)
        extras = {name: cat([getattr(p, name) for p in parts]) for name in ("timestamps", "held")
                  if all(getattr(p, name) is not None for p in parts)}  # beside actions, when every part has them
        with EpisodeWriter(tmp, ep.env_args, mode="a" if exists else "w") as writer:
            name = writer.add_episode(
                obs={k: cat([p.obs[k] for p in parts]) for k in parts[0].obs},
                actions=cat([p.actions for p in parts]), rewards=cat([p.rewards for p in parts]), dones=dones,
                next_obs={k: cat([p.next_obs[k] for p in parts]) for k in parts[0].next_obs}, attrs=attrs,
                extras=extras or None)
        _fsync(tmp)
        os.replace(tmp, out)  # the commit point
        _fsync(os.path.dirname(os.path.abspath(out)))
        if item.recovered:
            self.episodes_recovered += 1
        else:
            self.episodes_written += 1
        return name


def read_episode_journal(path: str) -> _OpenEpisode | None:
    """The episode in an open-episode journal, dropping a torn or corrupt tail (None: no steps)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("bad magic: not a qc-robot episode journal")
        head = read_frame(f, MAX_FRAME_BYTES)
        if head is None:
            return None
        h = msgpack.unpackb(head, raw=False)
        ep = _OpenEpisode(h["uuid"], h["session"], h["driver"], int(h["episode_id"]), h["out"], path, -1,
                          calibration_id=h.get("calibration_id", ""), env_args=dict(h["env_args"]))
        while (body := read_frame(f, MAX_FRAME_BYTES)) is not None:
            try:
                tr = P.decode(body)
            except P.ProtocolError:
                break
            if not isinstance(tr, P.Transition):
                break
            if ep.parts and tr.start_step > ep.next_step:
                ep.missing_steps += tr.start_step - ep.next_step
            ep.parts.append(tr)
            ep.next_step = tr.start_step + len(tr.actions)
            ep.success = ep.success or tr.success
    return ep if ep.parts else None


def _uuids(out: str) -> set[str]:
    """uuids of the complete episodes in ``out`` (none if it does not exist)."""
    if not os.path.exists(out):
        return set()
    import h5py

    with h5py.File(out, "r") as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            return set()
        return {str(g.attrs.get("uuid", "")) for k in data if k.startswith("demo_")
                and "num_samples" in (g := data[k]).attrs} - {""}


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
