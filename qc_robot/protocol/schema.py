"""The protocol's schema checks: from a parsed msgpack map to a checked message, in two steps.

1. :func:`read_envelope`: size, version, type (against what the receiver accepts) and the
   ``request_id`` where readable. Cheap: no array or image is decoded.
2. :func:`build`: every field checked against its annotation; arrays and images are decoded
   only now, as the :class:`Decoding` allows (which obs keys, which images, decoded now or left
   pending), so a receiver decides what a message may cost after admitting it.

:func:`decode` does both with everything decoded at once (clients, journals, tests).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from qc_robot.protocol.codec import Ext, pending_jpeg, unpack, unpack_array, unpack_jpeg
from qc_robot.protocol.messages import (
    ALLOWED_DTYPES,
    ARRAY_EXT,
    INT_MAX,
    INT_MIN,
    JPEG_EXT,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ErrorCode,
    Message,
    ProtocolError,
)

NON_NEGATIVE_FIELDS = frozenset({
    "hello.action_dim", "observation.request_id", "observation.episode_id", "observation.step",
    "transition.episode_id", "transition.start_step", "describe.request_id",
    "subscribe.from_seq", "subscribe.window", "ack.seq", "ack.persisted_seq", "policy_push.version",
})  # fmt: skip
"""``type.field`` integers a receiver refuses when negative (what peers send to the server)."""


@dataclass
class Envelope:
    """A message whose version and type are known and accepted; its fields are not checked yet."""

    kind: str
    cls: type[Message]
    body: dict[str, Any]
    request_id: int | None
    """The message's ``request_id`` when it is an int in range (for an error reply)."""


@dataclass
class Decoding:
    """What :func:`build` may decode. The default decodes arrays and refuses JPEG images."""

    jpeg_budget: list[int] | None = None
    """Decode JPEG images now, within ``jpeg_budget[0]`` decoded bytes for the whole message."""
    obs_keys: frozenset[str] | None = None
    """Obs maps keep only these keys; the others are dropped without being decoded (None: all)."""
    images: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Obs keys that may arrive as JPEG, with their declared (H, W, 3): checked from the headers
    and left as ``codec.PendingImage`` for the receiver to decode later."""


def read_envelope(data: bytes | bytearray | memoryview, accept: frozenset[str] | None = None) -> Envelope:
    """Parse ``data`` and check what identifies it; ProtocolError (with ``code`` and the readable
    ``request_id``) otherwise. ``accept``: the message types this receiver takes; a known type
    outside it is refused with ``unknown_type`` before its fields are looked at."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    body, unknown_ext = unpack(data)
    if not isinstance(body, dict):
        raise ProtocolError(f"message must be a map, got {type(body).__name__}")
    rid = body.get("request_id")
    rid = rid if type(rid) is int and 0 <= rid <= INT_MAX else None
    try:
        for k in body:
            if not isinstance(k, str):
                raise ProtocolError(f"message map keys must be strings, got {type(k).__name__}")
        version = body.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError("message has no integer protocol version 'v'")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})",
                                ErrorCode.VERSION)
        kind = body.get("type")
        cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {kind!r}", ErrorCode.UNKNOWN_TYPE)
        if accept is not None and kind not in accept:
            raise ProtocolError(f"this receiver does not take {kind!r} messages", ErrorCode.UNKNOWN_TYPE)
        if unknown_ext is not None:
            raise ProtocolError(f"unknown msgpack ext type {unknown_ext}")
    except ProtocolError as e:
        e.request_id = rid
        raise
    assert isinstance(kind, str)
    return Envelope(kind, cls, body, rid)


def build(env: Envelope, decoding: Decoding | None = None) -> Message:
    """The checked message of ``env``, decoding what ``decoding`` allows; ProtocolError (with the
    envelope's ``request_id``) names the first bad field."""
    ctx = decoding or Decoding()
    try:
        return _from_body(env, ctx)
    except ProtocolError as e:
        e.request_id = env.request_id
        raise


def decode(data: bytes | bytearray | memoryview, accept: frozenset[str] | None = None) -> Message:
    """Parse and validate one message with every array and image decoded (JPEG within 64 MiB of
    decoded bytes per message); raises ProtocolError (with ``code`` and the readable ``request_id``)."""
    return build(read_envelope(data, accept), Decoding(jpeg_budget=[MAX_MESSAGE_BYTES]))


def _from_body(env: Envelope, ctx: Decoding) -> Message:
    cls, kind, body = env.cls, env.kind, env.body
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{kind}: missing field {f.name!r}")
            continue
        value = _check(body[f.name], hints[f.name], f"{kind}.{f.name}", ctx)
        if type(value) is int and value < 0 and f"{kind}.{f.name}" in NON_NEGATIVE_FIELDS:
            raise ProtocolError(f"{kind}.{f.name}: must be >= 0, got {value}")
        kwargs[f.name] = value
    return cls(**kwargs)  # unknown keys are ignored (never decoded): later minor revisions may add fields


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _array(value: Any, where: str, ctx: Decoding, key: str | None = None) -> Any:
    """An ndarray field's value: ext 1 unpacked; ext 2 decoded now, left pending or refused."""
    if not isinstance(value, Ext) or value.code not in (ARRAY_EXT, JPEG_EXT):
        raise ProtocolError(f"{where}: expected an array (ext type {ARRAY_EXT}), got {type(value).__name__}")
    if value.code == ARRAY_EXT:
        return unpack_array(value.data)
    if key is not None and key in ctx.images:
        return pending_jpeg(value.data, ctx.images[key])
    if ctx.jpeg_budget is not None:
        return unpack_jpeg(value.data, ctx.jpeg_budget)
    raise ProtocolError(f"{where}: a JPEG image is accepted only for an observation field the driver declared "
                        "as a uint8 (H, W, 3) image")


def _free(value: Any, where: str, ctx: Decoding) -> Any:
    """A free-form value (``Any``): arrays inside are decoded, other extensions refused."""
    if isinstance(value, Ext):
        return _array(value, where, ctx)
    if isinstance(value, msgpack.Timestamp):
        raise ProtocolError(f"{where}: msgpack timestamps (ext -1) are not allowed")
    if isinstance(value, list):
        return [_free(v, where, ctx) for v in value]
    if isinstance(value, dict):
        return {k: _free(v, where, ctx) for k, v in value.items()}
    return value


def _check(value: Any, tp: Any, where: str, ctx: Decoding) -> Any:
    """Validate ``value`` against the annotation ``tp``; coerce ints to float where a float is due."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(value, inner, where, ctx)
    if tp is Any:
        return _free(value, where, ctx)
    if tp is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where}: expected int, got {type(value).__name__}")
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError(f"{where}: {value} is outside the int64 range")
        return value
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(f"{where}: expected number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected str, got {type(value).__name__}")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise ProtocolError(f"{where}: expected bin, got {type(value).__name__}")
        return value
    if tp is np.ndarray:
        return _array(value, where, ctx)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected list, got {type(value).__name__}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{where}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected map, got {type(value).__name__}")
        _, inner = typing.get_args(tp)
        for k in value:
            if not isinstance(k, str):  # msgpack lets bin keys through strict_map_key
                raise ProtocolError(f"{where}: map keys must be strings, got {type(k).__name__} {k!r:.40}")
        if inner is np.ndarray:  # an obs map: only the wanted keys are decoded
            keep = ctx.obs_keys
            return {k: _array(v, f"{where}[{k!r}]", ctx, k) for k, v in value.items() if keep is None or k in keep}
        return {k: _check(v, inner, f"{where}[{k!r}]", ctx) for k, v in value.items()}
    raise ProtocolError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def check_obs_spec(spec: list[dict[str, Any]], where: str = "obs_spec") -> list[tuple[str, tuple[int, ...], str]]:
    """Validate a wire obs spec; returns ``(key, shape, dtype)`` tuples."""
    out = []
    for i, f in enumerate(spec):
        key, shape, dtype = f.get("key"), f.get("shape"), f.get("dtype")
        if not isinstance(key, str) or not key:
            raise ProtocolError(f"{where}[{i}]: 'key' must be a non-empty string")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"{where}[{i}] ({key}): 'shape' must be a list of non-negative ints")
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"{where}[{i}] ({key}): dtype {dtype!r} not in {ALLOWED_DTYPES}")
        out.append((key, tuple(shape), str(dtype)))
    return out
