"""The robot-side outbox: transitions survive a server (or learner) that is away.

A driver's ``transition`` messages used to be fire-and-forget: whatever the robot did while the
server was down or restarting was lost. With an outbox, every transition is first appended to a
bounded on-disk log (checksummed frames, segment files) and numbered (``outbox_seq``; the outbox
has a stable ``id``, so a restarted driver process continues the same numbering). The server
acknowledges each one once it is journaled (``ack{seq}``); the client sends what is unacknowledged
in order, at most ``window`` ahead of the acknowledgements, and after a reconnect or ``resend_s``
without progress sends again from the first unacknowledged one. A transition delivered twice (its
acknowledgement was lost with the server) is applied once: the learner keeps the newest
``outbox_seq`` it applied per outbox, in its checkpoint.

Bounded: past ``max_bytes`` of unacknowledged data the oldest segment is dropped (counted in
``dropped`` and logged): a robot that runs for days without its server loses its oldest
experience, never its control loop. stdlib + the protocol only (the robot PC needs no torch).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from qc_robot import protocol as P
from qc_robot.data.frames import pack_frame, read_frame

log = logging.getLogger("qc_robot.outbox")
_SEQ = struct.Struct("<Q")
SEGMENT_BYTES = 4 << 20


class Outbox:
    """Numbered, durable, bounded queue of encoded transitions awaiting the server's ack."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = 256 << 20, window: int = 64,
                 resend_s: float = 2.0, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.window, self.resend_s = max_bytes, max(1, window), resend_s
        self.segment_bytes = segment_bytes
        id_file = self.dir / "id"
        if not id_file.exists():
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(uuid.uuid4().hex[:16])
            os.replace(tmp, id_file)
        self.id = id_file.read_text().strip()
        self.acked = int((self.dir / "acked").read_text()) if (self.dir / "acked").exists() else 0
        self.dropped = 0
        """Unacknowledged transitions dropped because the outbox was full."""
        self.resent = 0
        self._entries: list[tuple[int, bytes]] = []  # unacknowledged (seq, encoded), in order
        self._segments: list[tuple[int, Path]] = []  # (first seq, file)
        self._bytes = 0
        self._sent_upto = self.acked  # highest seq sent since the last rewind
        self._progress = time.monotonic()
        self._load()
        self.next_seq = max([self.acked, *(s for s, _ in self._entries)]) + 1
        self._file: BinaryIO | None = None
        self._prune()

    # -- episode numbers ------------------------------------------------------------------------

    @property
    def next_episode(self) -> int:
        """The first episode id a new run may use: one past the last one begun with this outbox.
        A restarted ``drive`` must not reuse the number of an episode its predecessor was cut in:
        the learner would read the new steps as that episode's continuation."""
        f = self.dir / "episode"
        return int(f.read_text()) + 1 if f.exists() else 0

    def begin_episode(self, episode_id: int) -> None:
        """Record (atomically) that ``episode_id`` has begun."""
        tmp = self.dir / "episode.tmp"
        tmp.write_text(str(episode_id))
        os.replace(tmp, self.dir / "episode")

    # -- producing ------------------------------------------------------------------------------

    def put(self, tr: P.Transition) -> int:
        """Number ``tr``, append it to disk (flushed) and queue it; returns its seq."""
        seq = self.next_seq
        self.next_seq += 1
        tr.outbox, tr.outbox_seq = self.id, seq
        data = P.encode(tr)
        if self._file is None or self._file.tell() >= self.segment_bytes:
            self._roll(seq)
        assert self._file is not None
        self._file.write(pack_frame(_SEQ.pack(seq) + data))
        self._file.flush()  # a crash of the driver process loses nothing already put
        self._entries.append((seq, data))
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._segments) > 1:
            self._drop_oldest_segment()
        return seq

    # -- delivering -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._entries)

    def due(self) -> list[tuple[int, bytes]]:
        """(seq, encoded) to send now: unsent ones within the window, or, after ``resend_s``
        without an acknowledgement, everything unacknowledged again from the oldest. Report each
        one actually sent with :meth:`sent`."""
        if not self._entries:
            return []
        now = time.monotonic()
        if self._sent_upto > self.acked and now - self._progress > self.resend_s:
            self.rewind()
            self._progress = now
        limit = self.acked + self.window
        return [(s, d) for s, d in self._entries if self._sent_upto < s <= limit]

    def sent(self, seq: int) -> None:
        if seq > self._sent_upto:
            if self._sent_upto <= self.acked:
                self._progress = time.monotonic()  # the resend clock runs from the first send
            self._sent_upto = seq

    def rewind(self) -> None:
        """Send everything unacknowledged again (a new server session)."""
        if self._sent_upto > self.acked:
            self.resent += self._sent_upto - self.acked
        self._sent_upto = self.acked

    def ack(self, seq: int) -> None:
        """The server journaled every transition up to ``seq``."""
        if seq <= self.acked:
            return
        seq = min(seq, self.next_seq - 1)
        self.acked = seq
        self._progress = time.monotonic()
        self._sent_upto = max(self._sent_upto, seq)
        n = 0
        while n < len(self._entries) and self._entries[n][0] <= seq:
            self._bytes -= len(self._entries[n][1])
            n += 1
        del self._entries[:n]
        tmp = self.dir / "acked.tmp"
        tmp.write_text(str(seq))
        os.replace(tmp, self.dir / "acked")
        self._prune()

    def _prune(self) -> None:
        """Delete segments whose every entry is acknowledged (never the one being written)."""
        first_unacked = self._entries[0][0] if self._entries else self.next_seq
        while len(self._segments) > 1 and self._segments[1][0] <= first_unacked:
            self._segments.pop(0)[1].unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- internals ------------------------------------------------------------------------------

    def _roll(self, first_seq: int) -> None:
        if self._file is not None:
            self._file.close()
        path = self.dir / f"seg-{first_seq:012d}.log"
        self._file = path.open("ab")
        self._segments.append((first_seq, path))

    def _drop_oldest_segment(self) -> None:
        first, path = self._segments.pop(0)
        nxt = self._segments[0][0]
        lost = [(s, d) for s, d in self._entries if s < nxt]
        del self._entries[: len(lost)]
        self._bytes -= sum(len(d) for _, d in lost)
        self.dropped += len(lost)
        path.unlink(missing_ok=True)
        log.error("outbox %s full (%d MiB unacknowledged): dropped %d oldest transitions", self.id,
                  self.max_bytes >> 20, len(lost))
        if lost:
            self.acked = max(self.acked, lost[-1][0])  # they will never be sent: numbering moves on
            self._sent_upto = max(self._sent_upto, self.acked)

    def _load(self) -> None:
        for path in sorted(self.dir.glob("seg-*.log")):
            first = int(path.stem.split("-")[1])
            self._segments.append((first, path))
            with path.open("rb") as f:
                while (payload := read_frame(f, P.MAX_MESSAGE_BYTES + _SEQ.size)) is not None:
                    (seq,) = _SEQ.unpack_from(payload)
                    if seq > self.acked:
                        self._entries.append((seq, payload[_SEQ.size:]))
                        self._bytes += len(payload) - _SEQ.size
        if self._entries:
            log.info("outbox %s: %d unacknowledged transitions from before (seq %d..%d)", self.id,
                     len(self._entries), self._entries[0][0], self._entries[-1][0])
