"""JPEG for camera images on the wire (protocol ext type 2): encode, check, decode.

numpy at import; the codec itself is OpenCV (``cv2``, the ``camera`` extra) or Pillow, whichever
is installed, imported on first use. Decoding is guarded against hostile input before any
decoder runs: the JPEG's own frame header (SOF marker) must declare exactly the (H, W) and the
3 colour components the message declares, so a small message cannot make the receiver allocate
a huge image; the number of scans is bounded (a progressive JPEG's decoding time grows with it),
and the decoded array is checked again.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length
MAX_SCANS = 64
"""Scans a JPEG may have (baseline: 1, typical progressive: ~10)."""


class ImageCodecError(ValueError):
    """Bytes that are not a JPEG of the declared size, or no codec installed."""


def jpeg_frame_size(data: bytes) -> tuple[int, int, int]:
    """``(height, width, components)`` from a JPEG's SOF segment, without decoding anything."""
    if data[:2] != b"\xff\xd8":
        raise ImageCodecError("not a JPEG (no SOI marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageCodecError(f"malformed JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            raise ImageCodecError("malformed JPEG: a segment runs past the end")
        if marker in _SOF:
            if length < 8:
                raise ImageCodecError("malformed JPEG: short frame header")
            h, w = struct.unpack_from(">HH", data, i + 5)
            return int(h), int(w), int(data[i + 9])
        if marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            break
        i += 2 + length
    raise ImageCodecError("malformed JPEG: no frame header")


def _backend() -> tuple[str, Any]:
    try:
        import cv2

        return "cv2", cv2
    except ImportError:
        pass
    try:
        from PIL import Image

        return "pil", Image
    except ImportError:
        raise ImageCodecError("JPEG images need OpenCV (pip install 'qc-robot[camera]') or Pillow") from None


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) RGB image at ``quality`` (1-100)."""
    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageCodecError(f"JPEG needs uint8 (H, W, 3), got {img.dtype}{list(img.shape)}")
    if not 1 <= quality <= 100:
        raise ImageCodecError(f"JPEG quality must be in 1..100, got {quality}")
    name, mod = _backend()
    if name == "cv2":
        ok, buf = mod.imencode(".jpg", img[:, :, ::-1], [mod.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise ImageCodecError("OpenCV could not encode the image")
        return bytes(buf)
    out = io.BytesIO()
    mod.fromarray(img, "RGB").save(out, format="JPEG", quality=int(quality))
    return out.getvalue()


def check_jpeg(data: bytes, shape: tuple[int, ...]) -> None:
    """Refuse, without decoding, a JPEG that is not exactly ``shape`` (H, W, 3) by its frame
    header, or that has more than ``MAX_SCANS`` scans (progressive decoding time grows with them)."""
    if len(shape) != 3 or shape[2] != 3:
        raise ImageCodecError(f"a JPEG image must be declared (H, W, 3), got {list(shape)}")
    h, w, comps = jpeg_frame_size(data)
    if (h, w) != tuple(shape[:2]) or comps != 3:
        raise ImageCodecError(f"JPEG holds {h}x{w} with {comps} components, message declares {list(shape)}")
    scans = data.count(b"\xff\xda")  # entropy-coded data stuffs 0xFF as FF 00: only real SOS markers match
    if scans > MAX_SCANS:
        raise ImageCodecError(f"JPEG has {scans} scans, at most {MAX_SCANS} accepted")


def decode_jpeg(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 (H, W, 3) RGB image of ``data``, which must be a JPEG of exactly ``shape``."""
    check_jpeg(data, shape)
    name, mod = _backend()
    if name == "cv2":
        bgr = mod.imdecode(np.frombuffer(data, np.uint8), mod.IMREAD_COLOR)
        if bgr is None:
            raise ImageCodecError("corrupt JPEG data")
        img = np.ascontiguousarray(bgr[:, :, ::-1])
    else:
        try:
            with mod.open(io.BytesIO(data)) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on corrupt data
            raise ImageCodecError(f"corrupt JPEG data ({e})") from None
    if img.shape != tuple(shape) or img.dtype != np.uint8:
        raise ImageCodecError(f"JPEG decoded to {img.dtype}{list(img.shape)}, declared {list(shape)}")
    return img


def jpeg_payload(image: np.ndarray, quality: int) -> bytes:
    """The protocol's ext-type-2 payload: u8 ndim (3) | 3 × u32 LE shape (H, W, 3) | JPEG bytes."""
    data = encode_jpeg(image, quality)
    return bytes([3]) + struct.pack("<3I", *image.shape) + data


def image_from_payload(payload: bytes, budget: list[int]) -> np.ndarray:
    """Inverse of :func:`jpeg_payload`. ``budget[0]``, the decoded bytes the message may still
    produce, is charged before decoding (a message of many tiny JPEGs cannot decode into gigabytes)."""
    if len(payload) < 13 or payload[0] != 3:
        raise ImageCodecError("malformed image header (expected ndim 3)")
    shape = struct.unpack_from("<3I", payload, 1)
    size = int(np.prod(shape, dtype=np.int64))
    if size > budget[0]:
        raise ImageCodecError(f"{list(shape)} exceeds the message's decoded-bytes limit")
    budget[0] -= size
    return decode_jpeg(payload[13:], shape)
