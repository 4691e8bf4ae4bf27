"""The ``metadata_props`` of an ONNX file, read without onnx or onnxruntime.

A robot PC checks which policy a server serves (``drive policy_expect=FILE``) with nothing but
the standard library: ``ModelProto.metadata_props`` (field 14, key/value string pairs) is read
straight from the protobuf wire format, skipping everything else (the graph) by its length.
"""

from __future__ import annotations

import os

_METADATA_PROPS = 14


def read_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's metadata map; ValueError when it is not a protobuf (not an ONNX model)."""
    with open(path, "rb") as f:
        data = f.read()
    props: dict[str, str] = {}
    for field, value in _fields(data):
        if field == _METADATA_PROPS and isinstance(value, bytes):
            entry = {k: v for k, v in _fields(value) if isinstance(v, bytes)}
            props[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    return props


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated protobuf (not an ONNX model?)")
        b = data[i]
        result |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint (not an ONNX model?)")


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of one message: ints, or bytes for length-delimited."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        tag, i = _varint(data, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((field, value))
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated protobuf (not an ONNX model?)")
            out.append((field, data[i:i + n]))
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (not an ONNX model?)")
    return out
