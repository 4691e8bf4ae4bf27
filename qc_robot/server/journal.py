"""A durable, append-only journal of records numbered by a gapless, increasing sequence.

The server writes every transition a driver sends here *before* streaming it to a learner, so a
learner that is down, slow or restarting loses nothing: it asks again from the last sequence
number it applied and the server re-reads the journal.

On disk: ``<dir>/journal.json`` (the journal's id) and segment files ``seg-<first_seq>.qcj``.
A segment is a run of frames ``u32 LE length | u32 LE crc32(payload) | payload`` where the payload
is a msgpack map with at least ``seq``. Every append is written and flushed to the OS at once (a
killed process loses nothing); ``fsync`` runs at most every ``fsync_s`` and on close (power loss).
Opening scans every segment: a torn or corrupt tail (a crash mid-write) is cut off, and so is
anything after it, so sequence numbers stay gapless. A new segment starts at every open and when
the current one exceeds ``segment_bytes``; :meth:`Journal.prune` deletes whole segments that a
learner has persisted.

Threads: one writer (``append``) and any number of readers (``read``) may run concurrently.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from qc_robot.data.frames import HEAD, pack_frame, read_frame

log = logging.getLogger("qc_robot.journal")
MAX_RECORD_BYTES = 64 << 20


@dataclass
class _Segment:
    first_seq: int
    path: Path
    offsets: array = field(default_factory=lambda: array("q"))
    """File offset of each record: record ``first_seq + i`` starts at ``offsets[i]``."""
    size: int = 0

    @property
    def end_seq(self) -> int:
        """One past the last record."""
        return self.first_seq + len(self.offsets)


class Journal:
    """Append records (msgpack-able maps) under increasing ``seq``; read them back from any seq."""

    def __init__(self, directory: str | os.PathLike[str], segment_bytes: int = 64 << 20,
                 fsync_s: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes, self.fsync_s = segment_bytes, fsync_s
        meta = self.dir / "journal.json"
        if not meta.exists():
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({"format": "qc-robot-journal", "format_version": 1, "id": uuid.uuid4().hex}))
            os.replace(tmp, meta)
        self.id: str = json.loads(meta.read_text())["id"]
        self._lock = threading.Lock()
        self._segments: list[_Segment] = self._scan()
        self.next_seq = self._segments[-1].end_seq if self._segments else 1
        self._file: BinaryIO | None = None
        self._last_fsync = time.monotonic()
        self._readers: dict[Path, BinaryIO] = {}

    # -- opening -------------------------------------------------------------------------------

    def _scan(self) -> list[_Segment]:
        segments: list[_Segment] = []
        paths = sorted(self.dir.glob("seg-*.qcj"), key=lambda p: int(p.stem[4:]))
        for i, path in enumerate(paths):
            seg = _Segment(int(path.stem[4:]), path)
            if segments and seg.first_seq != segments[-1].end_seq:
                self._quarantine(paths[i:], f"sequence gap before {path.name}")
                break
            good = self._scan_segment(seg)
            if seg.offsets:
                segments.append(seg)
            if good < path.stat().st_size:
                log.warning("journal %s: dropped a torn tail of %d bytes", path.name, path.stat().st_size - good)
                with path.open("r+b") as f:
                    f.truncate(good)
                if i + 1 < len(paths):  # a tear mid-journal: later segments would leave a gap
                    self._quarantine(paths[i + 1:], f"torn segment {path.name}")
                    break
            if not seg.offsets:
                path.unlink()
        return segments

    def _quarantine(self, paths: list[Path], why: str) -> None:
        for p in paths:
            log.error("journal: %s: moving %s aside", why, p.name)
            os.replace(p, p.with_suffix(".corrupt"))

    @staticmethod
    def _scan_segment(seg: _Segment) -> int:
        """Index ``seg``'s valid frames; returns the byte length of its valid prefix."""
        with seg.path.open("rb") as f:
            off = 0
            while True:
                payload = read_frame(f, MAX_RECORD_BYTES)
                if payload is None:
                    break
                try:
                    seq = msgpack.unpackb(payload, raw=False)["seq"]
                except Exception:
                    break
                if seq != seg.end_seq:
                    break
                seg.offsets.append(off)
                off = f.tell()
        seg.size = off
        return off

    # -- writing -------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> int:
        """Give ``record`` the next sequence number, write and flush it; returns the seq."""
        with self._lock:
            seq = self.next_seq
            payload = msgpack.packb({**record, "seq": seq}, use_bin_type=True)
            if len(payload) > MAX_RECORD_BYTES:
                raise ValueError(f"journal record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
            seg = self._writable(len(payload))
            assert self._file is not None
            self._file.write(pack_frame(payload))
            self._file.flush()  # in the OS now: survives a kill -9 of this process
            seg.offsets.append(seg.size)
            seg.size += HEAD.size + len(payload)
            self.next_seq = seq + 1
            now = time.monotonic()
            if now - self._last_fsync >= self.fsync_s:
                os.fsync(self._file.fileno())
                self._last_fsync = now
            return seq

    def _writable(self, n: int) -> _Segment:
        """The segment to append to: a fresh one at first use and when the current one is full."""
        if self._file is None or self._segments[-1].size + n > self.segment_bytes:
            if self._file is not None:
                os.fsync(self._file.fileno())
                self._file.close()
            seg = _Segment(self.next_seq, self.dir / f"seg-{self.next_seq:012d}.qcj")
            self._file = seg.path.open("xb")
            self._segments.append(seg)
        return self._segments[-1]

    def sync(self) -> None:
        """fsync what was written (also done on close and every ``fsync_s``)."""
        with self._lock:
            if self._file is not None:
                os.fsync(self._file.fileno())
                self._last_fsync = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
            for f in self._readers.values():
                f.close()
            self._readers.clear()

    # -- reading -------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest record still held (``next_seq`` when empty)."""
        with self._lock:
            return self._segments[0].first_seq if self._segments else self.next_seq

    def read(self, from_seq: int, max_records: int = 64, max_bytes: int = 8 << 20) -> list[dict[str, Any]]:
        """Up to ``max_records`` consecutive records starting at ``max(from_seq, first_seq)``."""
        out: list[dict[str, Any]] = []
        total = 0
        seq = from_seq
        while len(out) < max_records and total < max_bytes:
            with self._lock:
                seg = next((s for s in self._segments if s.first_seq <= seq < s.end_seq), None)
                if seg is None:
                    if self._segments and seq < self._segments[0].first_seq:
                        seq = self._segments[0].first_seq  # pruned: start at the oldest kept
                        continue
                    return out
                off = seg.offsets[seq - seg.first_seq]
                reader = self._readers.get(seg.path)
                if reader is None:
                    reader = self._readers[seg.path] = seg.path.open("rb")
                reader.seek(off)
                payload = read_frame(reader, MAX_RECORD_BYTES)
            if payload is None:
                raise OSError(f"journal {seg.path.name}: record {seq} fails its checksum (disk corruption?)")
            out.append(msgpack.unpackb(payload, raw=False))
            total += len(payload)
            seq += 1
        return out

    def prune(self, upto_seq: int) -> int:
        """Delete whole segments whose records all have ``seq <= upto_seq``; returns how many."""
        removed = 0
        with self._lock:
            while len(self._segments) > 1 and self._segments[0].end_seq - 1 <= upto_seq:
                seg = self._segments.pop(0)
                reader = self._readers.pop(seg.path, None)
                if reader is not None:
                    reader.close()
                seg.path.unlink(missing_ok=True)
                removed += 1
        return removed
