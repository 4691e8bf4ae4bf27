"""Messages a third party could send the control server: each defect found by fuzzing, pinned.

Real sockets on 127.0.0.1, a real server (in this process, or a child process where the test is
about the process: memory, exit codes). Every wait is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import test_server
import zmq
from test_server import ACT, OBS, EchoPolicy, H, Raw, driver_spec, obs, spec

from qc_robot import protocol as P
from qc_robot.data.hdf5_io import load_flat
from qc_robot.policies.base import ChunkResult, ObsField, PolicySpec
from qc_robot.policies.scripted import HoldPolicy
from qc_robot.server.app import ControlServer
from qc_robot.server.episode_log import EpisodeLogger

serve, clients = test_server.serve, test_server.clients  # the same fixtures


def _arr(a: np.ndarray) -> msgpack.ExtType:
    return P.pack_array(a)


def _raw_obs(rid: int, obs_map: object, **extra: object) -> bytes:
    body = {"v": 1, "type": "observation", "request_id": rid, "episode_id": 0, "step": 0, "timestamp": 0.0,
            "obs": obs_map, **extra}
    return msgpack.packb(body, use_bin_type=True, default=P._default)


def _transition(start: int, k: int = 1, act: int = ACT, value: float = 0.0, term: bool = False,
                episode: int = 0) -> P.Transition:
    o = np.full((k, OBS), start, np.float32)
    return P.Transition(episode, start, {"state": o}, np.full((k, act), value, np.float32), np.ones(k, np.float32),
                        np.array([False] * (k - 1) + [term]), np.zeros(k, bool), {"state": o + 1})


def _hello(raw: Raw) -> None:
    assert isinstance(raw.send(P.encode(driver_spec().hello("raw"))), P.Welcome)


def _still_serves(srv: ControlServer) -> None:
    """A fresh, valid driver still gets a checked chunk."""
    raw = Raw(srv.address)
    try:
        _hello(raw)
        ch = raw.send(P.encode(P.Observation(1, 0, 0, 0.0, obs(0.5))))
        assert isinstance(ch, P.Chunk) and ch.request_id == 1 and np.all(np.isfinite(ch.actions))
    finally:
        raw.close()


def _sync(raw: Raw, seq: int = 99) -> list[P.Message]:
    """Wait for a heartbeat's echo: everything this peer sent before it has been handled.
    Returns the other replies that came first."""
    raw.sock.send(P.encode(P.Heartbeat(seq, 0.0)))
    others: list[P.Message] = []
    while raw.sock.poll(5000):
        reply = P.decode(raw.sock.recv())
        if isinstance(reply, P.Heartbeat) and reply.seq == seq:
            return others
        others.append(reply)
    raise AssertionError("no heartbeat echo")


# -- crashes of the socket loop ----------------------------------------------------------------


def test_bytes_key_in_obs_map_is_refused_with_its_request_id(serve) -> None:
    srv = serve()
    raw = Raw(srv.address)
    try:
        _hello(raw)
        o = np.zeros(OBS, np.float32)
        err = raw.send(_raw_obs(3, {b"state": _arr(o), "other": _arr(o)}))  # mixed key types
        assert isinstance(err, P.Error) and err.code == P.ErrorCode.BAD_MESSAGE and err.request_id == 3
        assert "keys must be strings" in err.message
        err = raw.send(_raw_obs(4, {b"state": _arr(o)}))
        assert isinstance(err, P.Error) and err.request_id == 4
    finally:
        raw.close()
    _still_serves(srv)


@pytest.mark.parametrize("with_link", [False, True])
def test_zero_d_actions_in_a_transition_are_refused(serve, tmp_path: Path, with_link: bool) -> None:
    from qc_robot.server.journal import Journal
    from qc_robot.server.learner_link import LearnerLink

    link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / "j")) if with_link else None
    logger = None if with_link else EpisodeLogger(str(tmp_path / "log"), {"source": "test"})
    srv = serve(episode_logger=logger, learner_link=link)
    raw = Raw(srv.address)
    try:
        _hello(raw)
        tr = _transition(0)
        tr.actions = np.array(1.0, np.float32)  # 0-d
        raw.sock.send(P.encode(tr))
        err = P.decode(raw.sock.recv()) if raw.sock.poll(5000) else None
        assert isinstance(err, P.Error) and err.code == P.ErrorCode.BAD_TRANSITION
        assert "transition.actions" in err.message
    finally:
        raw.close()
    _still_serves(srv)
    assert srv.alive()


class _DyingPolicy(EchoPolicy):
    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        raise SystemExit("a policy that exits")  # not an Exception: nothing per message catches it


def test_a_thread_that_dies_marks_the_server_dead(serve, clients) -> None:
    srv = serve(_DyingPolicy())
    assert srv.alive()
    c = clients(srv)
    c.request(obs(), 0, 0)
    deadline = time.monotonic() + 5
    while srv.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not srv.alive() and "SystemExit" in (srv.dead_thread() or "")


# -- the protocol's promises -------------------------------------------------------------------


def test_error_replies_carry_the_readable_request_id(serve) -> None:
    srv = serve()
    raw = Raw(srv.address)
    try:
        _hello(raw)
        assert raw.send(_raw_obs(17, "not a map")).request_id == 17
        assert raw.send(_raw_obs(18, {"state": _arr(np.zeros(OBS, np.float32))}, step="x")).request_id == 18
        err = raw.send(_raw_obs(19, {"state": _arr(np.zeros(OBS, np.float32))}, step=-1))
        assert err.code == P.ErrorCode.BAD_MESSAGE and err.request_id == 19 and ">= 0" in err.message
        err = raw.send(_raw_obs(2**64 - 1, {}))  # outside int64: refused, and not echoed
        assert err.code == P.ErrorCode.BAD_MESSAGE and err.request_id is None
    finally:
        raw.close()


@pytest.mark.parametrize("kind", ["welcome", "chunk", "error", "subscribe", "policy_push", "description"])
def test_incomplete_server_only_types_are_unknown_type(serve, kind: str) -> None:
    srv = serve()
    raw = Raw(srv.address)
    try:
        err = raw.send(msgpack.packb({"v": 1, "type": kind}))
        assert isinstance(err, P.Error) and err.code == P.ErrorCode.UNKNOWN_TYPE, err
    finally:
        raw.close()


def test_transitions_are_checked_against_the_spec_and_the_rest_of_the_episode_is_kept(serve, tmp_path) -> None:
    logger = EpisodeLogger(str(tmp_path), {"source": "test"})
    srv = serve(episode_logger=logger)
    raw = Raw(srv.address)
    bad = {
        "actions": _transition(2, act=ACT + 1),
        "rewards": _transition(3),
        "obs": _transition(4),
        "start_step": _transition(1),  # goes back
    }
    bad["rewards"].rewards[0] = np.nan
    bad["obs"].obs = {"state": np.zeros((1, OBS + 1), np.float32)}
    try:
        _hello(raw)
        for step in (0, 1):
            raw.sock.send(P.encode(_transition(step)))
        for field, tr in bad.items():
            err = raw.send(P.encode(tr))
            assert err.code == P.ErrorCode.BAD_TRANSITION and f"transition.{field}" in err.message, (field, err)
        raw.sock.send(P.encode(_transition(5, term=True)))
        _sync(raw)
    finally:
        raw.close()
    srv.stop()
    demos = load_flat(logger.path)
    assert len(demos.actions) == 3 and np.all(np.isfinite(demos.rewards))
    np.testing.assert_array_equal(demos.observations[:, 0], [0, 1, 5])
    import h5py

    with h5py.File(logger.path) as f:
        assert int(f["data/demo_0"].attrs["missing_steps"]) == 3


def test_a_malformed_transition_gets_an_error_without_log_dir(serve) -> None:
    srv = serve()
    raw = Raw(srv.address)
    try:
        _hello(raw)
        tr = _transition(0)
        tr.next_obs = {}
        err = raw.send(P.encode(tr))
        assert err.code == P.ErrorCode.BAD_TRANSITION and "next_obs" in err.message
    finally:
        raw.close()


def test_refused_rehello_keeps_the_session(serve) -> None:
    srv = serve()
    raw = Raw(srv.address)
    try:
        _hello(raw)
        err = raw.send(P.encode(driver_spec(obs_dim=OBS + 1).hello("raw")))
        assert err.code == P.ErrorCode.SPEC_MISMATCH
        assert isinstance(raw.send(P.encode(P.Observation(1, 0, 0, 0.0, obs()))), P.Chunk)
    finally:
        raw.close()


def test_policy_describes_itself_before_hello_and_in_welcome(serve, clients) -> None:
    srv = serve(HoldPolicy(spec("v9")))
    c = clients(srv, connect=False)
    meta = c.describe(5.0)
    assert meta["obs"] == [{"key": "state", "shape": [OBS], "dtype": "float32"}]
    assert (meta["action_dim"], meta["chunk_len"], meta["control_hz"], meta["policy_version"]) == (ACT, H, 20.0, "v9")
    assert meta["action_low"] == [-1.0] * ACT and meta["action_high"] == [1.0] * ACT
    assert c.connect(5.0).metadata == meta


@pytest.mark.parametrize("trial", range(3))
def test_bye_reaches_a_driver_with_immediate_and_no_linger(serve, trial: int) -> None:
    srv = serve(bye_grace_s=60.0)  # the grace is only a hang guard here: the driver's bye ends it
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # the spec's recommended options
    sock.connect(srv.address)
    try:
        sock.send(P.encode(driver_spec().hello("raw")))
        assert sock.poll(30_000) and isinstance(P.decode(sock.recv()), P.Welcome)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        # the driver is busy with a control tick when the server goes: the bye waits unread (a poll
        # does not read it) and the server, having sent it, keeps the connection open meanwhile
        assert sock.poll(30_000), "no bye"
        assert stopper.is_alive(), "the server closed before the driver read its bye"
        got = P.decode(sock.recv())
        assert isinstance(got, P.Bye), got
        sock.send(P.encode(P.Bye("driver")))  # the driver's answer lets the server close at once
        stopper.join(30)
        assert not stopper.is_alive(), "the server waited out its grace despite the driver's bye"
    finally:
        sock.close(0)


def test_the_reference_client_answers_bye_and_reports_the_loss(serve, clients) -> None:
    srv = serve()
    c = clients(srv)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    deadline = time.monotonic() + 3
    while c.stats.lost == 0 and time.monotonic() < deadline:
        c.poll(0.02)
    stopper.join(5)
    assert c.stats.lost == 1 and not c.ready and c.offline_now > 0.0


# -- fairness and logging ----------------------------------------------------------------------


def test_a_flood_of_bad_messages_costs_counts_not_log_lines_or_replies(serve, caplog) -> None:
    srv = serve()
    raw = Raw(srv.address)
    n = 500
    try:
        with caplog.at_level(logging.WARNING, logger="qc_robot.server"):
            for _ in range(n):
                raw.sock.send(b"\xc1 garbage")
            replies = len(_sync(raw))
    finally:
        raw.close()
    assert srv.stats.errors[P.ErrorCode.BAD_MESSAGE] == n
    assert replies < 100 and srv.stats.unanswered == n - replies
    assert len([r for r in caplog.records if "bad_message" in r.getMessage()]) <= 2
    _still_serves(srv)


def test_learner_port_refuses_garbage_and_keeps_serving(tmp_path) -> None:
    from qc_robot.server.journal import Journal
    from qc_robot.server.learner_link import LearnerLink

    link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path)).start()
    raw = Raw(link.address)
    try:
        err = raw.send(msgpack.packb({"v": 1, "type": "subscribe", "learner": "x", "from_seq": {b"a": 1}}))
        assert err.code == P.ErrorCode.BAD_MESSAGE
        assert raw.send(msgpack.packb({"v": 1, "type": "transition_batch"})).code == P.ErrorCode.UNKNOWN_TYPE
        assert raw.send(msgpack.packb({"v": 1, "type": "ack", "seq": -1})).code == P.ErrorCode.BAD_MESSAGE
        assert isinstance(raw.send(P.encode(P.Subscribe("x", 1))), P.Subscribed)
        assert link.alive
    finally:
        raw.close()
        link.stop()


def test_messages_over_the_advertised_limit_are_refused_by_zeromq(serve) -> None:
    srv = serve(max_message_bytes=1 << 20)
    raw, big = Raw(srv.address), Raw(srv.address)
    try:
        meta = raw.send(P.encode(P.Describe(1)))
        assert isinstance(meta, P.Description) and meta.metadata["max_message_bytes"] == 1 << 20
        under = msgpack.packb({"v": 1, "type": "heartbeat", "seq": 5, "timestamp": 0.0, "pad": bytes((1 << 20) - 200)})
        assert isinstance(raw.send(under), P.Heartbeat)  # unknown fields are ignored, size is fine
        big.sock.send(bytes((1 << 20) + 1))  # ZeroMQ drops the connection: never buffered, never answered
        assert not big.sock.poll(500)
        assert srv.stats.received == 2  # the over-limit message never reached the server's code
        _sync(raw)
    finally:
        raw.close()
        big.close()


def test_the_default_limit_fits_the_policy() -> None:
    from qc_robot.policies.scripted import simple_spec
    from qc_robot.server.app import auto_message_limit

    assert auto_message_limit(simple_spec(37, 5, 5)) == 1 << 20  # small state: the 1 MiB floor
    image = PolicySpec([ObsField("image", (3, 224, 224), "uint8")], 7, 10, 10.0)
    assert auto_message_limit(image) >= 4 * 10 * 2 * 3 * 224 * 224  # a 4·H-step transition of images
    assert auto_message_limit(PolicySpec([ObsField("x", (4096, 4096), "float64")], 2, 50, 10.0)) == P.MAX_MESSAGE_BYTES
