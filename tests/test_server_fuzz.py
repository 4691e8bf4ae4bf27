"""Property: whatever a peer sends, a real server (recording episodes, learner port on) keeps
answering a valid driver with checked chunks, and never serves a non-finite or out-of-limit action.

Hypothesis draws sequences of raw messages: random bytes, random msgpack trees, and valid
messages (hello, observation, transition, heartbeat, describe, bye) with one field replaced by a
random value (wrong types, bin map keys, huge or negative ints, NaN/inf, arrays of wrong shape
or dtype, lying ndarray headers), sometimes split into several frames. Bounded to a few seconds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import ACT, OBS, driver_spec, spec

from qc_robot import protocol as P
from qc_robot.policies.scripted import RandomPolicy
from qc_robot.server.app import ControlServer
from qc_robot.server.episode_log import EpisodeLogger
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink


def _ext(dtype: str, shape: list[int], data: bytes) -> msgpack.ExtType:
    head = bytes([len(dtype)]) + dtype.encode() + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
    return msgpack.ExtType(P.ARRAY_EXT, head + data)


arrays = st.one_of(
    st.builds(lambda s, d: P.pack_array(np.zeros(s, d)),
              st.lists(st.integers(0, 5), max_size=3).map(tuple), st.sampled_from(["float32", "int8", "bool", "float64"])),
    st.builds(lambda v: P.pack_array(np.full((1, OBS), v, np.float32)),
              st.floats(allow_nan=True, allow_infinity=True, width=32)),
    st.builds(_ext, st.sampled_from(["float32", "object", "V4", "float3"]),
              st.lists(st.integers(0, 2**32 - 1), max_size=4), st.binary(max_size=24)),  # lying headers
    st.builds(lambda d: msgpack.ExtType(P.ARRAY_EXT, d), st.binary(max_size=16)),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8))
trees = st.recursive(st.one_of(scalars, arrays), lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(st.text(max_size=6), st.binary(max_size=4),
                                                          st.integers(-(2**63), 2**63)), kids, max_size=4)), max_leaves=12)


def _valid_bodies() -> list[dict[str, Any]]:
    o = np.zeros(OBS, np.float32)
    k = np.zeros((2, OBS), np.float32)
    msgs: list[P.Message] = [
        driver_spec().hello("fuzz"), P.Observation(1, 0, 0, 0.0, {"state": o}),
        P.Transition(0, 0, {"state": k}, np.zeros((2, ACT), np.float32), np.zeros(2, np.float32),
                     np.zeros(2, bool), np.array([False, True]), {"state": k}),
        P.Heartbeat(1, 0.0), P.Describe(3), P.Bye("x"),
    ]
    return [msgpack.unpackb(P.encode(m), raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d)) for m in msgs]


BODIES = _valid_bodies()


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    body = dict(draw(st.sampled_from(BODIES)))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(sorted(body)), st.text(max_size=5)))
        body[key] = draw(trees)
    if draw(st.booleans()) and "obs" in body:
        body["obs"] = {draw(st.sampled_from(["state", b"state", "x"])): draw(arrays)}
    data = msgpack.packb(body, use_bin_type=True)
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(data)))
        return [data[:cut], data[cut:]]  # multi-frame
    if draw(st.integers(0, 9)) == 0:
        return [data[: draw(st.integers(0, len(data)))]]  # truncated
    return [data]


messages = st.one_of(
    mutated(),
    st.binary(max_size=64).map(lambda b: [b]),
    trees.map(lambda t: [msgpack.packb(t, use_bin_type=True)]),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlServer, zmq.Socket, zmq.Socket]]:
    d: Path = tmp_path_factory.mktemp("fuzz")
    link = LearnerLink("tcp://127.0.0.1:*", Journal(d / "journal"))
    logger = EpisodeLogger(str(d / "log"), {"source": "fuzz"})
    srv = ControlServer(RandomPolicy(spec()), "tcp://127.0.0.1:*", episode_logger=logger, learner_link=link,
                        max_clients=64, error_burst=1e9, error_rate=1e9, errors_total_rate=1e9).start()
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(2):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(srv.address)
        socks.append(s)
    fuzz, good = socks
    good.send(P.encode(driver_spec().hello("good")))
    assert good.poll(5000) and isinstance(P.decode(good.recv()), P.Welcome)
    yield srv, fuzz, good
    for s in socks:
        s.close(0)
    srv.stop()


def _recv_all(sock: zmq.Socket, until_seq: int) -> list[P.Message]:
    out = []
    while sock.poll(5000):
        m = P.decode(sock.recv())
        if isinstance(m, P.Heartbeat) and m.seq == until_seq:
            return out
        out.append(m)
    raise AssertionError("server stopped answering")


_rid = iter(range(1, 10**9))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(messages, min_size=1, max_size=12))
def test_fuzzed_peers_never_stop_the_server(world, batch: list[list[bytes]]) -> None:
    srv, fuzz, good = world
    for frames in batch:
        fuzz.send_multipart(frames)
    replies = _recv_all(fuzz, _send_sync(fuzz))
    for m in replies:  # whatever the fuzzer got, no chunk it received is unchecked
        if isinstance(m, P.Chunk):
            assert np.all(np.isfinite(m.actions)) and np.all(np.abs(m.actions) <= 1.0)
    rid = next(_rid)
    good.send(P.encode(P.Observation(rid, 0, rid, 0.0, {"state": np.zeros(OBS, np.float32)})))
    got = _recv_all(good, _send_sync(good))
    chunks = [m for m in got if isinstance(m, P.Chunk) and m.request_id == rid]
    if not chunks:  # the reply may trail the heartbeat echo (inference runs on a worker)
        assert good.poll(5000)
        chunks = [m for m in [P.decode(good.recv())] if isinstance(m, P.Chunk) and m.request_id == rid]
    assert chunks and np.all(np.isfinite(chunks[0].actions)) and np.all(np.abs(chunks[0].actions) <= 1.0)
    assert srv.alive(), srv.dead_thread()


_seq = iter(range(10**6, 10**9))


def _send_sync(sock: zmq.Socket) -> int:
    seq = next(_seq)
    sock.send(P.encode(P.Heartbeat(seq, 0.0)))
    return seq
