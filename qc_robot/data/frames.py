"""Checksummed frames for append-only files: ``u32 LE length | u32 LE crc32(payload) | payload``.

Used by the teleop recording journal and the server's transition journal. A reader stops at the
first torn or corrupt frame, which is exactly what a crash in the middle of a write leaves.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

HEAD = struct.Struct("<II")


def pack_frame(payload: bytes) -> bytes:
    return HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def read_frame(f: BinaryIO, max_bytes: int) -> bytes | None:
    """The next frame's payload, or None at the end, a torn tail, an oversized length or a bad
    checksum (the file position is then undefined: callers stop reading)."""
    head = f.read(HEAD.size)
    if len(head) < HEAD.size:
        return None
    n, crc = HEAD.unpack(head)
    if n > max_bytes:
        return None
    payload = f.read(n)
    if len(payload) != n or zlib.crc32(payload) != crc:
        return None
    return payload
