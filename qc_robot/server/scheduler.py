"""Fair sharing of the inference workers between sessions.

Each session has a short FIFO of observations (``depth``, the requests a driver may pipeline);
one beyond it supersedes the oldest queued, which the caller answers ``superseded``. Workers take the slot of the session with the least
inference time so far, in start-time fair queueing: a session's tag is
``max(its last finish tag, virtual time) + cost`` and the virtual time is the start tag of the
job taken last. A session that floods therefore runs ahead of the virtual time and waits, and a
session that asks at its control rate is taken next, after at most the inferences already
running, however many sessions flood. A session has at most one job in inference at a time, so
one flooding session never holds more than one worker.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

K = TypeVar("K")
J = TypeVar("J")


class FairScheduler(Generic[K, J]):
    """Thread-safe: the socket loop ``put``s, workers ``get`` and ``charge``."""

    def __init__(self, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._cv = threading.Condition()
        self._slots: dict[K, collections.deque[J]] = {}  # per session, its queued jobs, oldest first
        self._finish: dict[K, float] = {}  # finish tag of each session's last job
        self._running: set[K] = set()  # sessions with a job in inference (until charged)
        self._vtime = 0.0
        self._closed = False

    def put(self, key: K, job: J) -> J | None:
        """Queue ``job`` as ``key``'s newest observation; returns the job it supersedes (the oldest
        queued, when ``depth`` are queued already), if any."""
        with self._cv:
            q = self._slots.setdefault(key, collections.deque())
            q.append(job)
            old = q.popleft() if len(q) > self.depth else None
            self._cv.notify_all()
            return old

    def get(self) -> tuple[K, J] | None:
        """The next job of a session with none in inference (blocking); None once closed. The
        caller must ``charge`` the key when the job is done."""
        with self._cv:
            while not self._closed and not (ready := [k for k in self._slots if k not in self._running]):
                self._cv.wait()
            if self._closed:
                return None
            key = min(ready, key=self._order)
            self._vtime = self._finish[key] = max(self._finish.get(key, self._vtime), self._vtime)
            self._running.add(key)
            q = self._slots[key]
            job = q.popleft()
            if not q:
                del self._slots[key]
            return key, job

    def _order(self, key: K) -> tuple[float, float]:
        """(start tag, last finish tag): on equal start tags the session served least lately goes
        first, so a driver that asks at its control rate beats flooders whose tag is the virtual time."""
        finish = self._finish.get(key, float("-inf"))
        return max(finish, self._vtime), finish

    def charge(self, key: K, seconds: float) -> None:
        """Record the inference time a job of ``key`` took: its next start tag moves on by it, and
        its next job may run."""
        with self._cv:
            self._running.discard(key)
            if key in self._finish:  # else dropped meanwhile: keep nothing of it
                self._finish[key] += seconds
            self._cv.notify_all()

    def drop(self, key: K) -> list[J]:
        """Forget ``key`` (its session ended); returns its queued jobs."""
        with self._cv:
            self._finish.pop(key, None)
            return list(self._slots.pop(key, ()))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        """Queued jobs."""
        with self._cv:
            return sum(len(q) for q in self._slots.values())

    def tags(self) -> int:
        """Sessions with a finish tag (bounded by the sessions)."""
        with self._cv:
            return len(self._finish)
