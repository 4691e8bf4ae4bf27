"""Admission before decoding (issue 31): JPEG bombs, decode budgets, request ids of malformed
arrays and images, and a session that survives an over-size message. Real sockets, real JPEGs."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import test_server
from test_server import Raw

from qc_robot import protocol as P
from qc_robot.drivers.client import PolicyClient
from qc_robot.policies.base import ObsField, PolicySpec
from qc_robot.policies.scripted import RandomPolicy
from qc_robot.server.admission import DecodeLimits
from qc_robot.server.app import ControlServer

cv2 = pytest.importorskip("cv2")
serve = test_server.serve
S = 32  # the policy's image: (S, S, 3)


def image_spec() -> PolicySpec:
    return PolicySpec([ObsField("state", (4,), "float32"), ObsField("image", (S, S, 3), "uint8")], 2, 5, 20.0)


def _hello() -> P.Hello:
    spec = image_spec()
    return P.Hello("cam", P.obs_spec_to_wire(spec.obs_fields), 2, -np.ones(2, np.float32), np.ones(2, np.float32),
                   20.0)


def _jpeg(h: int, w: int) -> bytes:
    from qc_robot.image_codec import encode_jpeg

    return encode_jpeg(np.zeros((h, w, 3), np.uint8), 10)


def _ext2(shape: tuple[int, int, int], jpeg: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(P.JPEG_EXT, bytes([3]) + struct.pack("<3I", *shape) + jpeg)


def _obs_bytes(rid: int, image: object, kind: str = "observation", **extra: object) -> bytes:
    body = {"v": 1, "type": kind, "request_id": rid, "episode_id": 0, "step": rid, "timestamp": 0.0,
            "obs": {"state": P.pack_array(np.zeros(4, np.float32)), "image": image}, **extra}
    return msgpack.packb(body, use_bin_type=True)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """349 KB of JPEG that decodes to 64 MiB (the issue's bomb)."""
    return _jpeg(4720, 4720)


@pytest.fixture
def image_server(serve) -> Iterator[ControlServer]:
    yield serve(RandomPolicy(image_spec()))


def _pinger(address: str, stop: threading.Event, rtts: list[float], answered: threading.Event) -> None:
    """Another peer's heartbeats, one at a time: how long each waits for its echo (``answered``
    is set at the first echo, or when one never comes)."""
    raw = Raw(address)
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            t0 = time.perf_counter()
            raw.sock.send(P.encode(P.Heartbeat(seq, 0.0)))
            while raw.sock.poll(30_000):
                m = P.decode(raw.sock.recv())
                if isinstance(m, P.Heartbeat) and m.seq == seq:
                    rtts.append(time.perf_counter() - t0)
                    answered.set()
                    break
            else:
                rtts.append(float("inf"))
                answered.set()
                return
    finally:
        raw.close()


def _worst_heartbeat_while(address: str, attacker: Raw, messages: list[bytes]) -> tuple[float, list[P.Message]]:
    """The slowest heartbeat echo another peer saw while ``attacker`` sent ``messages``, and the
    attacker's replies."""
    rtts: list[float] = []
    stop, answered = threading.Event(), threading.Event()
    t = threading.Thread(target=_pinger, args=(address, stop, rtts, answered))
    t.start()
    assert answered.wait(120), "the pinger is answered before the attack starts"
    for m in messages:
        attacker.sock.send(m)
    replies = _sync(attacker)  # every attack message has been handled
    stop.set()
    t.join(60)
    return max(rtts), replies


def _sync(raw: Raw, seq: int = 7777) -> list[P.Message]:
    raw.sock.send(P.encode(P.Heartbeat(seq, 0.0)))
    others = []
    while raw.sock.poll(60_000):
        m = P.decode(raw.sock.recv())
        if isinstance(m, P.Heartbeat) and m.seq == seq:
            return others
        others.append(m)
    raise AssertionError("no heartbeat echo")


def test_a_jpeg_bomb_does_not_freeze_another_peers_heartbeat(image_server: ControlServer, bomb: bytes) -> None:
    srv = image_server
    attacker = Raw(srv.address)
    try:
        assert isinstance(attacker.send(P.encode(_hello())), P.Welcome)
        # same sizes, nothing to decode: the same-run baseline
        junk = bytes([0xFF, 0xD8]) + bytes(len(bomb) - 2)
        baseline, _ = _worst_heartbeat_while(srv.address, attacker, [
            _obs_bytes(i, _ext2((S, S, 3), junk)) for i in range(8)])
        bombs = [
            _obs_bytes(1, _ext2((4720, 4720, 3), bomb)),  # declares another size than the session
            _obs_bytes(2, _ext2((S, S, 3), bomb)),  # the ext header lies, the JPEG's own header does not
            msgpack.packb({"v": 1, "type": "heartbeat", "seq": 5, "timestamp": 0.0,
                           "pad": _ext2((4720, 4720, 3), bomb)}),  # inside a heartbeat
            msgpack.packb({"v": 1, "type": "no_such_type", "x": _ext2((4720, 4720, 3), bomb)}),
            _obs_bytes(3, _ext2((S, S, 3), _jpeg(S, S)), extra_key=_ext2((4720, 4720, 3), bomb)),
        ] * 2
        worst, replies = _worst_heartbeat_while(srv.address, attacker, bombs)
    finally:
        attacker.close()
    assert worst < 5 * baseline + 0.25, f"heartbeat waited {worst:.3f} s under bombs, {baseline:.3f} s under junk"
    assert srv.stats.images_decoded <= 2  # only the two honest 32x32 images (unless superseded)
    codes = sorted(str(getattr(m, "message", "")) for m in replies if isinstance(m, P.Error))
    assert any("declares [4720, 4720, 3], the session declared [32, 32, 3]" in c for c in codes)
    assert any("holds 4720x4720" in c for c in codes)


def test_jpeg_only_for_declared_images_and_a_malformed_one_names_its_request(image_server: ControlServer) -> None:
    srv = image_server
    raw, stranger = Raw(srv.address), Raw(srv.address)
    try:
        err = stranger.send(_obs_bytes(4, _ext2((S, S, 3), _jpeg(S, S))))  # no session: nothing decoded
        assert err.code == P.ErrorCode.NO_SESSION and err.request_id == 4
        assert isinstance(raw.send(P.encode(_hello())), P.Welcome)
        ok = raw.send(_obs_bytes(5, _ext2((S, S, 3), _jpeg(S, S))))
        assert isinstance(ok, P.Chunk) and ok.request_id == 5 and srv.stats.images_decoded == 1
        for rid, image in [(6, _ext2((S, S, 3), b"\0" * 64)),  # not a JPEG
                           (7, _ext2((S, S, 3), _jpeg(S, S)[:40])),  # truncated headers
                           (8, msgpack.ExtType(P.ARRAY_EXT, b"\x05uint8\x03" + bytes(8)))]:  # malformed array
            err = raw.send(_obs_bytes(rid, image))
            assert isinstance(err, P.Error) and err.code == P.ErrorCode.BAD_MESSAGE and err.request_id == rid, err
        body = msgpack.unpackb(_obs_bytes(9, None), raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
        body["obs"] = {"state": _ext2((4, 1, 3), _jpeg(4, 1)), "image": P.pack_array(np.zeros((S, S, 3), np.uint8))}
        err = raw.send(msgpack.packb(body))  # JPEG for a float field: never decoded
        assert err.code == P.ErrorCode.BAD_MESSAGE and err.request_id == 9 and "accepted only" in err.message
        rows = {"state": P.pack_array(np.zeros((1, 4), np.float32)), "image": _ext2((S, S, 3), _jpeg(S, S))}
        raw.sock.send(msgpack.packb({"v": 1, "type": "transition", "episode_id": 0, "start_step": 0, "obs": rows,
                                     "actions": P.pack_array(np.zeros((1, 2), np.float32)),
                                     "rewards": P.pack_array(np.zeros(1, np.float32)),
                                     "terminals": P.pack_array(np.zeros(1, bool)),
                                     "truncated": P.pack_array(np.zeros(1, bool)), "next_obs": rows}))
        err = _sync(raw)[0]  # a transition's rows are arrays: a JPEG there is refused undecoded
        assert err.code == P.ErrorCode.BAD_MESSAGE and "accepted only" in err.message
        assert srv.stats.images_decoded == 1
        corrupt = bytearray(_jpeg(S, S))
        corrupt[-30:-2] = b"\xff\x00" * 14  # headers fine, entropy data broken: found by the decoder
        reply = raw.send(_obs_bytes(10, _ext2((S, S, 3), bytes(corrupt))))
        assert reply.request_id == 10
    finally:
        raw.close()
        stranger.close()
    assert srv.alive()


@pytest.mark.parametrize("limits,why", [
    (DecodeLimits(peer_bytes_s=S * S * 3 * 1.3), "decoded-bytes budget"),
    (DecodeLimits(peer_s=1e-9), "decoding time budget"),
])
def test_decode_budget_per_peer(serve, limits: DecodeLimits, why: str) -> None:
    srv = serve(RandomPolicy(image_spec()), decode_limits=limits)
    raw, other = Raw(srv.address), Raw(srv.address)
    try:
        for r in (raw, other):
            assert isinstance(r.send(P.encode(_hello())), P.Welcome)
        image = _ext2((S, S, 3), _jpeg(S, S))
        assert isinstance(raw.send(_obs_bytes(1, image)), P.Chunk)
        err = raw.send(_obs_bytes(2, image))
        assert err.code == P.ErrorCode.RATE_LIMITED and err.request_id == 2 and why in err.message
        plain = raw.send(_obs_bytes(3, P.pack_array(np.zeros((S, S, 3), np.uint8))))
        assert isinstance(plain, P.Chunk)  # raw images cost no decoding
        assert isinstance(other.send(_obs_bytes(4, image)), P.Chunk)  # another peer has its own budget
    finally:
        raw.close()
        other.close()
    assert srv.stats.images_decoded == 2


def test_decode_budget_for_all_peers_together(serve) -> None:
    srv = serve(RandomPolicy(image_spec()), decode_limits=DecodeLimits(total_bytes_s=S * S * 3 * 1.3))
    first, second = Raw(srv.address), Raw(srv.address)
    try:
        for r in (first, second):
            assert isinstance(r.send(P.encode(_hello())), P.Welcome)
        image = _ext2((S, S, 3), _jpeg(S, S))
        assert isinstance(first.send(_obs_bytes(1, image)), P.Chunk)
        err = second.send(_obs_bytes(2, image))  # its own budget is full; the shared one is spent
        assert err.code == P.ErrorCode.RATE_LIMITED and err.request_id == 2, err
    finally:
        first.close()
        second.close()
    assert srv.stats.images_decoded == 1


def test_a_session_survives_its_own_over_size_message(serve) -> None:
    from test_server import driver_spec, obs

    srv = serve(max_message_bytes=1 << 20)
    client = PolicyClient(srv.address, driver_spec().hello("big"))
    try:
        session = client.connect(5.0).session
        big = np.zeros((1, 1 << 19), np.float32)  # 2 MiB: ZeroMQ drops the connection
        tr = P.Transition(0, 0, {"state": big}, np.zeros((1, 2), np.float32), np.zeros(1, np.float32),
                          np.zeros(1, bool), np.zeros(1, bool), {"state": big})
        assert client.send_transition(tr)
        reply, deadline = None, time.monotonic() + 20
        while not isinstance(reply, P.Chunk) and time.monotonic() < deadline:
            rid = client.request(obs(0.5), 0, 1)  # None while ZeroMQ reconnects (IMMEDIATE)
            reply = client.poll(0.5) if rid is not None else client.poll(0.05)
            if rid is not None and reply is None:
                client.cancel()  # lost with the dropped connection: ask again, same session
        assert isinstance(reply, P.Chunk), reply
        assert client.stats.reconnects == 0 and client.stats.lost == 0 and client.welcome is not None
        assert client.welcome.session == session and srv.held()["sessions"] == 1
    finally:
        client.close()
