"""The protocol's msgpack codec: messages to bytes, and bytes to a map whose arrays wait.

Every message is one msgpack map ``{"v": 1, "type": <name>, ...fields}``; numpy arrays travel as
msgpack ExtType 1 (dtype name, shape, raw little-endian bytes) and only dtypes in an allow-list
are accepted, so decoding never builds objects (no pickle, no object/void/complex dtypes).
Camera images may travel as JPEG instead (ExtType 2, opt-in per sender).

Parsing (:func:`unpack`) keeps every extension value as an :class:`Ext` (its bytes, nothing
decoded), so a receiver can read the envelope (version, type, request id) and admit the message
before paying for arrays or images (``schema.build`` materializes them).
Imports only numpy, msgpack and the standard library; JPEG needs ``qc_robot.image_codec``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from qc_robot.protocol.messages import (
    ALLOWED_DTYPES,
    ARRAY_EXT,
    JPEG_EXT,
    MAX_NDIM,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
)


@dataclass(frozen=True, slots=True)
class Ext:
    """A msgpack extension value as received: ``code`` and payload, not yet decoded."""

    code: int
    data: bytes


@dataclass(frozen=True)
class PendingImage:
    """A JPEG observation field whose headers were checked against the declared shape; decoded
    later, off the socket loop (``decode``)."""

    shape: tuple[int, int, int]
    jpeg: bytes

    @property
    def nbytes(self) -> int:
        """Bytes the decoded image takes."""
        return self.shape[0] * self.shape[1] * self.shape[2]

    def decode(self) -> np.ndarray:
        """The uint8 (H, W, 3) RGB image; ProtocolError if the JPEG data is corrupt."""
        from qc_robot.image_codec import ImageCodecError, decode_jpeg

        try:
            return decode_jpeg(self.jpeg, self.shape)
        except ImageCodecError as e:
            raise ProtocolError(f"JPEG image: {e}") from None


# ---------------------------------------------------------------------------------------------
# Arrays: ExtType(1, u8 len(dtype) | dtype ascii | u8 ndim | ndim × u32 LE | raw LE C-order data)


def pack_array(arr: np.ndarray) -> msgpack.ExtType:
    """An ndarray as ExtType 1; raises ProtocolError for dtypes outside the allow-list."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {arr.dtype} is not allowed on the wire (allowed: {ALLOWED_DTYPES})")
    if arr.ndim > MAX_NDIM:
        raise ProtocolError(f"array has {arr.ndim} dims, at most {MAX_NDIM} allowed")
    wire = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # always little-endian
    head = bytes([len(name)]) + name.encode("ascii") + bytes([arr.ndim])
    head += struct.pack(f"<{arr.ndim}I", *arr.shape)
    return msgpack.ExtType(ARRAY_EXT, head + wire.tobytes())


def unpack_array(payload: bytes) -> np.ndarray:
    """Inverse of :func:`pack_array`; validates every length. Returns a fresh writable array."""
    try:
        n = payload[0]
        name = payload[1 : 1 + n].decode("ascii")
        ndim = payload[1 + n]
        off = 2 + n
        shape = struct.unpack_from(f"<{ndim}I", payload, off)
    except (IndexError, UnicodeDecodeError, struct.error) as e:
        raise ProtocolError(f"truncated or malformed array header: {e}") from None
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"array dtype {name!r} is not allowed")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"array has {ndim} dims, at most {MAX_NDIM} allowed")
    off += 4 * ndim
    dtype = np.dtype(name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) - off != expected:
        raise ProtocolError(f"array {name}{list(shape)} needs {expected} data bytes, got {len(payload) - off}")
    arr = np.frombuffer(payload, dtype=dtype, offset=off, count=math.prod(shape)).reshape(shape)
    if name == "bool" and arr.size and np.frombuffer(payload, np.uint8, offset=off).max() > 1:
        raise ProtocolError("bool array holds bytes other than 0/1")
    return arr.astype(dtype.newbyteorder("="), copy=True)


# ---------------------------------------------------------------------------------------------
# JPEG images: ExtType(2, u8 ndim (3) | 3 × u32 LE (H, W, 3) | JPEG bytes)


def pack_jpeg(arr: np.ndarray, quality: int) -> msgpack.ExtType:
    """A uint8 (H, W, 3) RGB image as ExtType 2 (``qc_robot.image_codec.jpeg_payload``)."""
    from qc_robot.image_codec import ImageCodecError, jpeg_payload

    try:
        return msgpack.ExtType(JPEG_EXT, jpeg_payload(arr, quality))
    except ImageCodecError as e:
        raise ProtocolError(str(e)) from None


def unpack_jpeg(payload: bytes, budget: list[int]) -> np.ndarray:
    """Inverse of :func:`pack_jpeg`, decoded now; ``budget[0]`` (decoded bytes left in this
    message) is charged first."""
    from qc_robot.image_codec import ImageCodecError, image_from_payload

    try:
        return image_from_payload(payload, budget)
    except ImageCodecError as e:
        raise ProtocolError(f"JPEG image: {e}") from None


def pending_jpeg(payload: bytes, declared: tuple[int, ...]) -> PendingImage:
    """An ext-2 payload checked, without decoding, against the ``declared`` (H, W, 3) shape: the
    ext header and the JPEG's own frame header must both say exactly that."""
    from qc_robot.image_codec import ImageCodecError, check_jpeg

    if len(payload) < 13 or payload[0] != 3:
        raise ProtocolError("JPEG image: malformed image header (expected ndim 3)")
    shape = struct.unpack_from("<3I", payload, 1)
    if tuple(shape) != tuple(declared):
        raise ProtocolError(f"JPEG image declares {list(shape)}, the session declared {list(declared)}")
    jpeg = payload[13:]
    try:
        check_jpeg(jpeg, shape)
    except ImageCodecError as e:
        raise ProtocolError(f"JPEG image: {e}") from None
    return PendingImage((shape[0], shape[1], shape[2]), jpeg)


# ---------------------------------------------------------------------------------------------
# Messages ⇄ bytes


def _is_image(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 3 and obj.shape[2] == 3


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise ProtocolError(f"cannot encode {type(obj).__name__} (only msgpack types and ndarrays)")


def encode(msg: Message, jpeg_quality: int = 0) -> bytes:
    """Serialize a message (one ZeroMQ frame). ``jpeg_quality`` 1-100: every uint8 (H, W, 3)
    array travels as a JPEG (ext type 2; lossy, decoded back to the array by the receiver);
    0: all arrays raw (ext type 1)."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for f in dataclasses.fields(msg):
        body[f.name] = getattr(msg, f.name)
    default = _default
    if jpeg_quality:
        def default(obj: Any) -> Any:
            return pack_jpeg(obj, jpeg_quality) if _is_image(obj) else _default(obj)
    try:
        return msgpack.packb(body, default=default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"cannot encode {msg.TYPE}: {e}") from None


def unpack(data: bytes | bytearray | memoryview) -> tuple[Any, int | None]:
    """``(parsed msgpack value, first unknown extension code or None)``. Extension values stay
    :class:`Ext` (nothing decoded); an unknown code is reported, not raised, so the caller can
    name the request it refuses. ProtocolError for bytes that are not one msgpack value."""
    unknown: list[int] = []

    def hook(code: int, payload: bytes) -> Ext:
        if code not in (ARRAY_EXT, JPEG_EXT):
            unknown.append(code)
        return Ext(code, payload)

    try:
        body = msgpack.unpackb(data, raw=False, ext_hook=hook, strict_map_key=True, timestamp=0)
    except Exception as e:  # msgpack raises many types on garbage: report them all the same way
        raise ProtocolError(f"undecodable message ({type(e).__name__}: {e})") from None
    return body, (unknown[0] if unknown else None)
