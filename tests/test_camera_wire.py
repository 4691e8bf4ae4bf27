"""Images on the wire: uint8 (H, W, 3) arrays raw or as JPEG (ext type 2, decoded before the
policy sees them), the server's checks for image fields, hostile JPEG payloads, and a real
server whose policy reads the image it was sent."""

from __future__ import annotations

import struct
import time

import msgpack
import numpy as np
import pytest

from qc_robot import protocol as P
from qc_robot.policies.base import ChunkResult, ObsField, PolicySpec
from qc_robot.server.checks import (
    auto_message_limit,
    check_hello,
    check_observation,
    check_transition,
)

pytest.importorskip("cv2")


def _scene(h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth image with edges, like a camera's (JPEG's home ground; noise would not compress)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = (220, 30, 30)  # a red cube
    return img


def _obs(img: np.ndarray) -> P.Observation:
    return P.Observation(1, 0, 0, 0.0, {"state": np.zeros(4, np.float32), "image": img})


def test_raw_and_jpeg_observations_decode_to_the_uint8_image() -> None:
    img = _scene()
    raw = P.decode(P.encode(_obs(img)))
    assert isinstance(raw, P.Observation)
    np.testing.assert_array_equal(raw.obs["image"], img)  # raw: exact
    data = P.encode(_obs(img), jpeg_quality=90)
    msg = P.decode(data)
    assert isinstance(msg, P.Observation)
    got = msg.obs["image"]
    assert got.dtype == np.uint8 and got.shape == (64, 64, 3) and got.flags.writeable
    assert np.abs(got.astype(int) - img).mean() < 3  # lossy, close
    assert got[20, 20, 0] > 180 and got[20, 20, 2] < 80  # colours kept in RGB order
    assert len(data) < len(P.encode(_obs(img))) / 3
    np.testing.assert_array_equal(msg.obs["state"], np.zeros(4, np.float32))  # other arrays stay raw


def _ext2(shape: tuple[int, int, int], jpeg: bytes) -> bytes:
    payload = bytes([3]) + struct.pack("<3I", *shape) + jpeg
    body = {"v": 1, "type": "observation", "request_id": 7, "episode_id": 0, "step": 0, "timestamp": 0.0,
            "obs": {"image": msgpack.ExtType(P.JPEG_EXT, payload)}}
    return msgpack.packb(body, use_bin_type=True)


def test_hostile_jpeg_payloads_are_refused_before_decoding() -> None:
    from qc_robot.image_codec import encode_jpeg

    jpeg = encode_jpeg(_scene(16, 16), 80)
    assert isinstance(P.decode(_ext2((16, 16, 3), jpeg)), P.Observation)
    with pytest.raises(P.ProtocolError, match="holds 16x16.*declares"):
        P.decode(_ext2((8, 8, 3), jpeg))  # the message lies about the size
    with pytest.raises(P.ProtocolError, match="decoded-bytes limit"):
        P.decode(_ext2((60000, 60000, 3), jpeg))  # 10 GB declared: refused, nothing allocated
    with pytest.raises(P.ProtocolError, match="not a JPEG"):
        P.decode(_ext2((16, 16, 3), b"\x00" * 64))
    with pytest.raises(P.ProtocolError, match="malformed JPEG"):
        P.decode(_ext2((16, 16, 3), jpeg[:20]))
    bomb = encode_jpeg(np.zeros((2048, 2048, 3), np.uint8), 10)  # ~40 KB that decodes to 12 MiB
    many = {f"k{i}": msgpack.ExtType(P.JPEG_EXT, bytes([3]) + struct.pack("<3I", 2048, 2048, 3) + bomb)
            for i in range(8)}
    body = {"v": 1, "type": "observation", "request_id": 1, "episode_id": 0, "step": 0, "timestamp": 0.0,
            "obs": many}
    with pytest.raises(P.ProtocolError, match="decoded-bytes limit"):
        P.decode(msgpack.packb(body, use_bin_type=True))  # 8 x 12 MiB > the 64 MiB a message may decode to
    with pytest.raises(P.ProtocolError, match=r"uint8 \(H, W, 3\)"):
        P.pack_jpeg(np.zeros((4, 4), np.uint8), 90)


def _image_spec(h: int = 32) -> PolicySpec:
    return PolicySpec([ObsField("state", (4,), "float32"), ObsField("image", (h, h, 3), "uint8")], 2, 5, 20.0)


def test_server_checks_take_uint8_images_with_exact_shape_and_dtype() -> None:
    spec = _image_spec()
    img = _scene(32, 32)
    out = check_observation(spec, {"state": np.zeros(4), "image": img})
    assert out["image"].dtype == np.uint8 and out["state"].dtype == np.float32
    with pytest.raises(ValueError, match="dtype float32, expected uint8"):
        check_observation(spec, {"state": np.zeros(4), "image": img.astype(np.float32)})  # never cast
    with pytest.raises(ValueError, match=r"shape \[32, 31, 3\]"):
        check_observation(spec, {"state": np.zeros(4), "image": img[:, :31]})
    hello = P.Hello("cam", [{"key": "state", "shape": [4], "dtype": "float64"},
                            {"key": "image", "shape": [32, 32, 3], "dtype": "float32"}], 2,
                    -np.ones(2, np.float32), np.ones(2, np.float32), 20.0)
    problems, _ = check_hello(spec, hello)
    assert problems == ["observation 'image': policy expects uint8 (an image), driver sends float32"]
    k = 3
    tr = P.Transition(0, 0, {"state": np.zeros((k, 4)), "image": np.zeros((k, 32, 32, 3), np.uint8)},
                      np.zeros((k, 2), np.float32), np.zeros(k, np.float32), np.zeros(k, bool), np.zeros(k, bool),
                      {"state": np.zeros((k, 4)), "image": np.zeros((k, 32, 32, 3), np.float64)})
    with pytest.raises(ValueError, match=r"next_obs\['image'\] has dtype float64"):
        check_transition(spec, tr)
    # the driver port's limit counts image bytes: a 4·H-step transition of 128x128 frames fits
    big = _image_spec(128)
    step = 2 * (128 * 128 * 3 + 16) + 4 * 2 + 64
    assert auto_message_limit(big) >= 4 * big.chunk_len * step


class _MeanColour:
    """A policy that answers the image's mean red and green (in [0, 1]) as its actions."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.seen: list[np.ndarray] = []

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        img = obs["image"]
        assert img.dtype == np.uint8 and img.shape == self.spec.obs_fields[1].shape
        self.seen.append(img.copy())
        a = np.array([img[..., 0].mean(), img[..., 1].mean()], np.float32) / 255.0
        return ChunkResult(np.tile(a, (self.spec.chunk_len, 1)), 0.0)


@pytest.mark.parametrize("quality", [0, 85])
def test_a_served_policy_sees_the_decoded_image(quality: int) -> None:
    from qc_robot.drivers.client import PolicyClient
    from qc_robot.server.app import ControlServer

    spec = _image_spec()
    policy = _MeanColour(spec)
    srv = ControlServer(policy, "tcp://127.0.0.1:*").start()
    hello = P.Hello("cam", P.obs_spec_to_wire(spec.obs_fields), 2, -np.ones(2, np.float32),
                    np.ones(2, np.float32), 20.0)
    client = PolicyClient(srv.address, hello, jpeg_quality=quality)
    img = _scene(32, 32)
    try:
        client.connect(5.0)
        assert client.request({"state": np.zeros(4, np.float32), "image": img}, 0, 0, reset=True) is not None
        end = time.monotonic() + 5.0
        reply = None
        while reply is None and time.monotonic() < end:
            reply = client.poll(0.05)
        assert isinstance(reply, P.Chunk)
    finally:
        client.close()
        srv.stop()
    seen = policy.seen[0]
    if quality == 0:
        np.testing.assert_array_equal(seen, img)
    else:
        assert 0 < np.abs(seen.astype(int) - img).mean() < 4  # JPEG: close, not exact
    want = np.array([img[..., 0].mean(), img[..., 1].mean()]) / 255.0
    np.testing.assert_allclose(reply.actions[0], want, atol=0.02)
