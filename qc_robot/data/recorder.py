"""Crash-safe recording of episodes into our robomimic-layout HDF5 file.

Design (what a kill -9 at any moment leaves behind):

* every step goes to ``<out>.journal`` (``qc_robot.data.journal``): append-only, checksummed
  frames handed to the OS each step, so a kill loses at most the frame being written;
* a finished episode gets an ``end`` frame (its label), then is *committed*: ``atomic`` mode
  copies the file to ``<out>.commit.tmp``, appends the episode there, fsyncs and ``os.replace``-s
  it over ``<out>``, so ``<out>`` is always either the old or the new complete file (a kill
  inside an in-place HDF5 write was seen to leave links pointing past the end of the file).
  ``inplace`` appends directly (no copy: for large image datasets) and accepts that risk;
* only after the commit is the journal deleted. Every episode carries a ``uuid`` attr, so
  recovering a journal whose episode did reach the file (kill between replace and unlink) adds
  nothing twice.

:func:`recover` turns a leftover journal into a demo (label from its ``end`` frame, else
``'unlabelled'``; attr ``recovered=True``); :class:`Recorder` runs it automatically on open.
A ``<out>.lock`` file (``flock``) keeps two recorders off one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

import h5py
import numpy as np

from qc_robot.data.hdf5_io import DatasetError, EpisodeWriter
from qc_robot.data.journal import (
    JournalError,
    JournalWriter,
    RecordedEpisode,
    new_episode,
    read_journal,
)
from qc_robot.data.rewards import with_reward_source

COMMIT_MODES = ("atomic", "inplace")


def journal_path(out: str) -> str:
    return out + ".journal"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_uuids(out: str) -> set[str]:
    """uuids of the complete episodes in ``out`` (none if it does not exist)."""
    if not os.path.exists(out):
        return set()
    with h5py.File(out, "r") as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            return set()
        # only complete demos count: an in-place commit killed half-way leaves the uuid on a partial group
        return {str(g.attrs.get("uuid", "")) for k in data if k.startswith("demo_")
                and "num_samples" in (g := data[k]).attrs} - {""}


def _drop_partial_demos(out: str) -> None:
    """Delete demo groups without ``num_samples``: what an in-place commit killed half-way leaves."""
    if not os.path.exists(out):
        return
    with h5py.File(out, "a") as f:
        data = f.get("data")
        if isinstance(data, h5py.Group):
            for k in [k for k in data if k.startswith("demo_") and "num_samples" not in data[k].attrs]:
                del data[k]


def commit_episode(out: str, ep: RecordedEpisode, mode: str = "atomic") -> str:
    """Append ``ep`` to ``out`` (created if missing); returns the demo name."""
    if mode not in COMMIT_MODES:
        raise ValueError(f"commit mode must be one of {COMMIT_MODES}, got {mode!r}")
    if len(ep) == 0:
        raise ValueError("cannot commit an episode without steps")
    exists = os.path.exists(out)
    target = out if mode == "inplace" else out + ".commit.tmp"
    if mode == "atomic" and exists:
        shutil.copyfile(out, target)
    with EpisodeWriter(target, ep.env_args, mode="a" if exists else "w") as w:
        name = w.add_episode(**ep.writer_args())
    if mode == "atomic":
        _fsync_path(target)
        os.replace(target, out)  # the commit point
        _fsync_path(os.path.dirname(os.path.abspath(out)))
    return name


def recover(out: str, commit: str = "atomic") -> str | None:
    """Commit a leftover ``<out>.journal`` into ``out``; returns the demo name (None: nothing to add).

    A torn tail frame is dropped; a journal without steps, or whose uuid is already in ``out``,
    is just removed. Raises DatasetError if the journal's env_args do not match ``out``'s.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out + ".commit.tmp")  # a commit that never reached its replace
    jp = journal_path(out)
    if not os.path.exists(jp):
        return None
    try:
        ep = read_journal(jp).episode
    except JournalError:
        os.unlink(jp)  # killed before the begin frame was out: no step was recorded
        return None
    if len(ep) == 0 or ep.uuid in complete_uuids(out):
        os.unlink(jp)
        return None
    ep.attrs["recovered"] = True
    if commit == "inplace":
        _drop_partial_demos(out)
    name = commit_episode(out, ep, commit)
    os.unlink(jp)
    return name


def acquire_lock(out: str) -> IO[str]:
    """Hold ``<out>.lock`` (flock) until the returned file is closed; DatasetError if taken."""
    lock = open(out + ".lock", "a")  # noqa: SIM115 - the caller holds it
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock on this platform: one writer per file is up to the user
        pass
    except OSError:
        lock.close()
        raise DatasetError(f"{out}: another process is recording into or editing this file") from None
    return lock


@contextlib.contextmanager
def locked(out: str) -> Iterator[None]:
    """Exclusive use of ``out`` against recorders and other edits."""
    lock = acquire_lock(out)
    try:
        yield
    finally:
        lock.close()


class Recorder:
    """Records episodes one at a time into ``out`` (context manager; holds ``<out>.lock``).

    ``begin`` → ``step``* → ``finish(label)`` (commit) or ``discard()``. On open, a leftover
    journal from a crashed run is recovered first (``self.recovered`` names the demo).
    """

    def __init__(self, out: str, env_args: Mapping[str, Any], commit: str = "atomic", fsync: bool = False) -> None:
        if commit not in COMMIT_MODES:
            raise ValueError(f"commit mode must be one of {COMMIT_MODES}, got {commit!r}")
        self.out, self.env_args, self.commit, self.fsync = os.fspath(out), dict(env_args), commit, fsync
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        self._lock = acquire_lock(self.out)
        try:
            self._check_env_args()
            self.recovered = recover(self.out, commit)
        except BaseException:
            self._lock.close()
            raise
        self._journal: JournalWriter | None = None

    def _check_env_args(self) -> None:
        if not os.path.exists(self.out):
            return
        with h5py.File(self.out, "r") as f:
            raw = f["data"].attrs.get("env_args", "{}") if "data" in f else "{}"
        theirs = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        ours = json.loads(json.dumps(self.env_args))
        if theirs != ours and with_reward_source(theirs) == with_reward_source(ours):
            self.env_args = theirs  # a file from before env_args stated its reward source: the same data
            return
        if theirs != ours:
            diff = sorted(k for k in set(theirs) | set(self.env_args) if theirs.get(k) != self.env_args.get(k))
            raise DatasetError(f"{self.out} was recorded with other env_args (differ in {diff}); "
                               "record into a new file and `qc-robot dataset merge` later if compatible")

    def num_demos(self) -> int:
        if not os.path.exists(self.out):
            return 0
        with h5py.File(self.out, "r") as f:
            return sum(1 for k in f.get("data", {}) if k.startswith("demo_"))

    @property
    def recording(self) -> bool:
        return self._journal is not None

    def begin(self, first_obs: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
        """Start an episode at observation ``first_obs``; attrs go onto its demo group."""
        if self._journal is not None:
            raise RuntimeError("an episode is already being recorded")
        a = dict(attrs)
        a.setdefault("start_time", time.time())
        self._journal = JournalWriter(journal_path(self.out), new_episode(self.env_args, a, first_obs), self.fsync)

    def step(self, action: np.ndarray, reward: float, done: bool, next_obs: Mapping[str, np.ndarray]) -> None:
        if self._journal is None:
            raise RuntimeError("no episode in progress")
        self._journal.step(action, reward, done, next_obs)

    @property
    def steps(self) -> int:
        return len(self._journal.episode) if self._journal is not None else 0

    def finish(self, label: str, attrs: Mapping[str, Any] | None = None) -> str | None:
        """End the episode as ``label`` ('success'/'failure') and commit it; returns the demo name.

        An episode without steps is dropped (None).
        """
        if self._journal is None:
            raise RuntimeError("no episode in progress")
        j, self._journal = self._journal, None
        if len(j.episode) == 0:
            j.discard()
            return None
        j.end(label, {"end_time": time.time(), **dict(attrs or {})})
        j.close()
        name = commit_episode(self.out, j.episode, self.commit)
        j.discard()  # committed: the journal has done its job
        return name

    def discard(self) -> None:
        """Drop the episode in progress (operator: discard and re-record)."""
        if self._journal is not None:
            self._journal.discard()
            self._journal = None

    def close(self) -> None:
        """Release the lock; an unfinished episode's journal stays for recovery."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._lock.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
