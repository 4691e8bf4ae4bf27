"""Property (issue 31, item 6): image observations, hostile JPEGs among them, never stop a server
with every option on (CURVE, episode log, learner port with its journal, decode budgets), and a
valid driver sending JPEG observations is answered with checked chunks after every batch.

Hostile JPEGs: frame headers declaring other sizes (up to the 4720x4720 bomb), ext headers that
lie about the JPEG inside, truncations, corrupt entropy data, thousands of scan markers, random
bytes behind a JPEG start marker; inside observations, heartbeats, transitions and unknown keys.
Bounded to a few seconds."""

from __future__ import annotations

import functools
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import ACT, OBS

from qc_robot import protocol as P
from qc_robot.drivers.base import DriverSpec
from qc_robot.policies.base import ObsField, PolicySpec
from qc_robot.policies.scripted import RandomPolicy
from qc_robot.server.admission import DecodeLimits
from qc_robot.server.app import ControlServer
from qc_robot.server.episode_log import EpisodeLogger
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import CurveKeys, LearnerLink, make_keys

S = 16  # the policy's camera: (S, S, 3)
FIELDS = [ObsField("state", (OBS,), "float32"), ObsField("image", (S, S, 3), "uint8")]


@functools.cache
def _jpeg(h: int = S, w: int = S) -> bytes:
    """A real JPEG; noise at the policy's size, flat (about 350 KB) at the bomb's 4720x4720."""
    from qc_robot.image_codec import ImageCodecError, encode_jpeg

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (h, w, 3), np.uint8) if h * w <= S * S else np.zeros((h, w, 3), np.uint8)
    try:
        return encode_jpeg(image, 75 if h * w <= S * S else 10)
    except ImageCodecError as e:
        pytest.skip(str(e))


def _with_frame_size(jpeg: bytes, h: int, w: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) claiming ``h`` x ``w``."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9 :]


def _ext2(shape: tuple[int, ...], jpeg: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(P.JPEG_EXT, bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape) + jpeg)


@st.composite
def hostile_jpegs(draw: st.DrawFn) -> msgpack.ExtType:
    good = _jpeg()
    sizes = st.sampled_from([0, 1, S - 1, S, S + 1, 4720, 65535])
    kind = draw(st.integers(0, 6))
    if kind == 0:
        jpeg = _with_frame_size(good, draw(sizes), draw(sizes))  # the frame header lies
    elif kind == 1:
        jpeg = good[: draw(st.integers(0, len(good)))]
    elif kind == 2:
        body = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            body[draw(st.integers(len(good) // 2, len(good) - 3))] = draw(st.integers(0, 255))
        jpeg = bytes(body)  # headers intact, entropy data corrupt: found only by the decoder
    elif kind == 3:
        jpeg = good[:-2] + b"\xff\xda" * draw(st.integers(60, 5000)) + b"\xff\xd9"  # scan markers
    elif kind == 4:
        jpeg = b"\xff\xd8" + draw(st.binary(max_size=64))
    elif kind == 5:
        jpeg = _jpeg(4720, 4720) if draw(st.integers(0, 3)) == 0 else _with_frame_size(good, 4720, 4720)
    else:
        jpeg = good
    shape = (S, S, 3) if draw(st.integers(0, 2)) else draw(st.one_of(  # the ext header: mostly the declared size
        st.just((4720, 4720, 3)), st.lists(st.integers(0, 2**32 - 1), max_size=4).map(tuple)))
    return _ext2(shape, jpeg)


def _observation(rid: int, image: object, state: object = None) -> dict:
    return {"v": 1, "type": "observation", "request_id": rid, "episode_id": 0, "step": rid, "timestamp": 0.0,
            "obs": {"state": state or P.pack_array(np.zeros(OBS, np.float32)), "image": image}}


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    ext = draw(hostile_jpegs())
    rid = draw(st.integers(1, 2**31))
    where = draw(st.integers(0, 5))
    if where <= 2:
        body = _observation(rid, ext)
    elif where == 3:
        body = _observation(rid, P.pack_array(np.zeros((S, S, 3), np.uint8)), state=ext)  # JPEG for floats
    elif where == 4:
        body = {"v": 1, "type": draw(st.sampled_from(["heartbeat", "describe", "no_such_type"])), "seq": 1,
                "timestamp": 0.0, "request_id": rid, "pad": ext}
    else:
        rows = {"state": P.pack_array(np.zeros((1, OBS), np.float32)), "image": ext}
        body = {"v": 1, "type": "transition", "episode_id": 0, "start_step": rid, "obs": rows, "next_obs": rows,
                "actions": P.pack_array(np.zeros((1, ACT), np.float32)),
                "rewards": P.pack_array(np.zeros(1, np.float32)), "terminals": P.pack_array(np.zeros(1, bool)),
                "truncated": P.pack_array(np.zeros(1, bool))}
    if draw(st.integers(0, 4)) == 0:
        body["obs" if "obs" in body else "extra"] = {"image": ext, "unknown": ext}  # keys the policy never reads
    return msgpack.packb(body, use_bin_type=True)


def _hello(name: str) -> bytes:
    return P.encode(DriverSpec(FIELDS, ACT, -np.ones(ACT), np.ones(ACT), 20.0).hello(name))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlServer, zmq.Socket, zmq.Socket]]:
    _jpeg()  # skip without a JPEG codec
    d: Path = tmp_path_factory.mktemp("fuzz_images")
    keys = {name: make_keys(str(d / name), name) for name in ("server", "driver")}
    (d / "authorized").mkdir()
    shutil.copy(keys["driver"][0], d / "authorized")
    link = LearnerLink("tcp://127.0.0.1:*", Journal(d / "journal"))
    logger = EpisodeLogger(str(d / "log"), {"source": "fuzz_images"})
    srv = ControlServer(RandomPolicy(PolicySpec(FIELDS, ACT, 3, 20.0)), "tcp://127.0.0.1:*", episode_logger=logger,
                        learner_link=link, max_clients=64, error_burst=1e9, error_rate=1e9, errors_total_rate=1e9,
                        curve=CurveKeys.from_files(keys["server"][1], authorized_dir=str(d / "authorized")),
                        decode_limits=DecodeLimits()).start()
    client_keys = CurveKeys.from_files(keys["driver"][1], keys["server"][0])
    socks = []
    for name in ("fuzz", "good"):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        client_keys.apply(s, server=False)
        s.connect(srv.address)
        s.send(_hello(name))
        assert s.poll(10_000) and isinstance(P.decode(s.recv()), P.Welcome)
        socks.append(s)
    yield srv, socks[0], socks[1]
    for s in socks:
        s.close(0)
    srv.stop()


_seq = iter(range(10**6, 10**9))
_rid = iter(range(1, 10**9))


def _replies_until_echo(sock: zmq.Socket) -> list[P.Message]:
    seq = next(_seq)
    sock.send(P.encode(P.Heartbeat(seq, 0.0)))
    out = []
    while sock.poll(30_000):
        m = P.decode(sock.recv())
        if isinstance(m, P.Heartbeat) and m.seq == seq:
            return out
        out.append(m)
    raise AssertionError("server stopped answering")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(hostile_messages(), min_size=1, max_size=8))
def test_hostile_images_never_stop_the_server(world, batch: list[bytes]) -> None:
    srv, fuzz, good = world
    fuzz.send(_hello("fuzz"))  # a bye among earlier batches ends the session: every batch has one
    for data in batch:
        fuzz.send(data)
    for m in _replies_until_echo(fuzz):
        if isinstance(m, P.Chunk):
            assert np.all(np.isfinite(m.actions)) and np.all(np.abs(m.actions) <= 1.0)
    rid = next(_rid)
    image = np.random.default_rng(rid).integers(0, 255, (S, S, 3), np.uint8)
    good.send(P.encode(P.Observation(rid, 0, rid, 0.0, {"state": np.zeros(OBS, np.float32), "image": image}),
                       jpeg_quality=80))
    got = _replies_until_echo(good)
    while not any(isinstance(m, P.Chunk) and m.request_id == rid for m in got):  # inference trails the echo
        assert good.poll(30_000), f"no chunk for the valid driver's request {rid}: {got}"
        got.append(P.decode(good.recv()))
    chunk = next(m for m in got if isinstance(m, P.Chunk) and m.request_id == rid)
    assert np.all(np.isfinite(chunk.actions)) and np.all(np.abs(chunk.actions) <= 1.0)
    assert srv.alive(), srv.dead_thread()
