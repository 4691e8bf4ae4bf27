"""The control server over real sockets on 127.0.0.1 (random ports); every wait is bounded."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from qc_robot import protocol as P
from qc_robot.drivers.base import DriverSpec
from qc_robot.drivers.client import HandshakeError, PolicyClient
from qc_robot.policies.base import ChunkResult, ObsField, PolicySpec
from qc_robot.policies.scripted import HoldPolicy, simple_spec
from qc_robot.server.app import ControlServer

OBS, ACT, H = 4, 2, 3


def spec(version: str = "v1") -> PolicySpec:
    return simple_spec(OBS, ACT, H, 20.0, version=version)


class EchoPolicy:
    """Every action = obs[0] (so a reply shows which observation it answers); optional delay."""

    def __init__(self, delay_s: float = 0.0, value: float | None = None) -> None:
        self.spec, self.delay_s, self.value = spec(), delay_s, value

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        time.sleep(self.delay_s)
        v = obs["state"][0] if self.value is None else self.value
        return ChunkResult(np.full((H, ACT), v, np.float32), self.delay_s)


class GatedPolicy:
    """Reports each observation's ``state[0]`` as it enters inference, then waits for a release:
    a test orders events by which observation is in inference, not by the clock."""

    def __init__(self) -> None:
        self.spec = spec()
        self.entered: queue.Queue[float] = queue.Queue()
        self.gate = threading.Semaphore(0)

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        self.entered.put(float(obs["state"][0]))
        assert self.gate.acquire(timeout=60), "never released"
        return ChunkResult(np.zeros((H, ACT), np.float32), 0.0)

    def next_in(self) -> float:
        return self.entered.get(timeout=30)


def driver_spec(obs_dim: int = OBS, act: int = ACT, hz: float = 20.0) -> DriverSpec:
    return DriverSpec([ObsField("state", (obs_dim,), "float32")], act, -np.ones(act), np.ones(act), hz)


def obs(v: float = 0.0) -> dict[str, np.ndarray]:
    o = np.zeros(OBS, np.float32)
    o[0] = v
    return {"state": o}


@pytest.fixture
def serve() -> Iterator:
    servers: list[ControlServer] = []

    def start(policy=None, **kw) -> ControlServer:
        s = ControlServer(policy or EchoPolicy(), kw.pop("bind", "tcp://127.0.0.1:*"), **kw).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def clients() -> Iterator:
    made: list[PolicyClient] = []

    def make(server: ControlServer | str, ds: DriverSpec | None = None, connect: bool = True) -> PolicyClient:
        addr = server if isinstance(server, str) else server.address
        c = PolicyClient(addr, (ds or driver_spec()).hello("test"))
        made.append(c)
        if connect:
            c.connect(5.0)
        return c

    yield make
    for c in made:
        c.close()


def ask(c: PolicyClient, o: dict, step: int = 0, episode: int = 0, timeout: float = 5.0):
    rid = c.request(o, episode, step)
    assert rid is not None
    reply = c.poll(timeout)
    assert reply is not None, "no reply"
    return rid, reply


class Raw:
    """A bare DEALER socket for sending bytes the real client never would."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, data: bytes | list[bytes]) -> P.Message:
        if isinstance(data, list):
            self.sock.send_multipart(data)
        else:
            self.sock.send(data)
        assert self.sock.poll(5000), "no reply"
        return P.decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)


def test_handshake_welcome_carries_policy_spec(serve, clients) -> None:
    srv = serve(HoldPolicy(spec("v42")))
    w = clients(srv).welcome
    assert w is not None and w.session and w.policy_version == "v42"
    assert (w.chunk_len, w.action_dim, w.control_hz) == (H, ACT, 20.0)
    assert w.obs_spec == [{"key": "state", "shape": [OBS], "dtype": "float32"}]
    np.testing.assert_array_equal(w.action_high, np.ones(ACT))


@pytest.mark.parametrize("ds,needle", [
    (driver_spec(obs_dim=OBS + 1), "shape"),
    (driver_spec(act=ACT + 1), "action_dim"),
    (driver_spec(hz=10.0), "control rate"),
    (DriverSpec([ObsField("image", (OBS,), "uint8")], ACT, -np.ones(ACT), np.ones(ACT), 20.0), "state"),
])
def test_spec_mismatch_is_refused(serve, clients, ds: DriverSpec, needle: str) -> None:
    srv = serve()
    c = clients(srv, ds, connect=False)
    with pytest.raises(HandshakeError) as e:
        c.connect(5.0)
    assert e.value.error is not None and e.value.error.code == P.ErrorCode.SPEC_MISMATCH
    assert needle in e.value.error.message


def test_chunk_is_stamped(serve, clients) -> None:
    srv = serve(EchoPolicy(delay_s=0.01))
    c = clients(srv)
    rid, ch = ask(c, obs(0.5), step=7, episode=3)
    assert isinstance(ch, P.Chunk)
    assert (ch.request_id, ch.episode_id, ch.start_step, ch.policy_version) == (rid, 3, 7, "v1")
    assert ch.actions.shape == (H, ACT) and ch.actions.dtype == np.float32
    np.testing.assert_allclose(ch.actions, 0.5)
    assert ch.infer_ms >= 9.0 and ch.total_ms >= ch.infer_ms and ch.queue_ms >= 0.0


def test_bad_input_gets_errors_and_server_keeps_serving(serve, clients) -> None:
    srv = serve()
    raw = Raw(srv.address)
    try:
        assert raw.send(b"\x00\xffnot msgpack").code == P.ErrorCode.BAD_MESSAGE
        assert raw.send([b"a", b"b"]).code == P.ErrorCode.BAD_MESSAGE  # two frames
        assert raw.send(msgpack.packb({"v": 1, "type": "nope"})).code == P.ErrorCode.UNKNOWN_TYPE
        assert raw.send(msgpack.packb({"v": 99, "type": "hello"})).code == P.ErrorCode.VERSION
        before = raw.send(P.encode(P.Observation(5, 0, 0, 0.0, obs())))
        assert before.code == P.ErrorCode.NO_SESSION and before.request_id == 5
        assert isinstance(raw.send(P.encode(driver_spec().hello("raw"))), P.Welcome)
        assert raw.send(P.encode(P.Welcome("x", [], 1, 1, 1.0, np.zeros(1), np.zeros(1), "v"))).code == \
            P.ErrorCode.UNKNOWN_TYPE
        bad_shape = raw.send(P.encode(P.Observation(6, 0, 0, 0.0, {"state": np.zeros(OBS + 2, np.float32)})))
        assert bad_shape.code == P.ErrorCode.BAD_OBSERVATION and bad_shape.request_id == 6
        nan = obs()
        nan["state"][1] = np.nan
        assert raw.send(P.encode(P.Observation(7, 0, 0, 0.0, nan))).code == P.ErrorCode.BAD_OBSERVATION
        missing = raw.send(P.encode(P.Observation(8, 0, 0, 0.0, {"other": np.zeros(OBS)})))
        assert missing.code == P.ErrorCode.BAD_OBSERVATION
        ok = raw.send(P.encode(P.Observation(9, 0, 0, 0.0, obs(0.25))))
        assert isinstance(ok, P.Chunk) and ok.request_id == 9
    finally:
        raw.close()
    _, ch = ask(clients(srv), obs(0.1))
    assert isinstance(ch, P.Chunk)
    assert srv.stats.errors[P.ErrorCode.BAD_OBSERVATION] == 3


@pytest.mark.parametrize("value,ok", [(5.0, True), (-3.0, True), (np.nan, False), (np.inf, False)])
def test_actions_are_clipped_and_nan_never_served(serve, clients, value: float, ok: bool) -> None:
    srv = serve(EchoPolicy(value=value))
    _, reply = ask(clients(srv), obs())
    if ok:
        assert isinstance(reply, P.Chunk) and reply.clipped == H * ACT
        assert np.all(np.abs(reply.actions) <= 1.0)
    else:
        assert isinstance(reply, P.Error) and reply.code == P.ErrorCode.POLICY_ERROR


class WrongShapePolicy(EchoPolicy):
    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        return ChunkResult(np.zeros((H + 1, ACT), np.float32), 0.0)


class CrashingPolicy(EchoPolicy):
    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        raise RuntimeError("boom")


@pytest.mark.parametrize("policy", [WrongShapePolicy(), CrashingPolicy()])
def test_misbehaving_policy_gives_policy_error(serve, clients, policy) -> None:
    srv = serve(policy)
    c = clients(srv)
    for _ in range(2):  # and the server keeps going
        _, reply = ask(c, obs())
        assert isinstance(reply, P.Error) and reply.code == P.ErrorCode.POLICY_ERROR


def test_slow_inference_does_not_block_handshakes_or_heartbeats(serve, clients) -> None:
    policy = GatedPolicy()
    srv = serve(policy)
    a = clients(srv)
    try:
        assert a.request(obs(1.0), 0, 0) is not None
        assert policy.next_in() == 1.0  # A's inference has begun; the gate holds it there
        b = clients(srv, connect=False)
        b.connect(30.0)  # handshake while A's inference runs (hang guard: a blocked loop never answers)
        assert b.ping(30.0) is not None
        assert a.poll(0.0) is None  # the order: B was answered while A's inference was still held
        policy.gate.release()
        assert isinstance(a.poll(30.0), P.Chunk)
    finally:
        for _ in range(4):
            policy.gate.release()


def test_several_drivers_each_get_answers_to_their_own_observations(serve, clients) -> None:
    srv = serve(EchoPolicy(delay_s=0.002), workers=2)
    cs = [clients(srv) for _ in range(4)]
    failures: list[str] = []

    def drive(i: int, c: PolicyClient) -> None:
        for k in range(10):
            v = (i * 10 + k) / 100
            rid, reply = ask(c, obs(v), step=k, episode=i)
            if not (isinstance(reply, P.Chunk) and reply.request_id == rid and reply.start_step == k
                    and reply.episode_id == i and np.allclose(reply.actions, v)):
                failures.append(f"driver {i} step {k}: {reply}")

    threads = [threading.Thread(target=drive, args=(i, c)) for i, c in enumerate(cs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not failures
    assert srv.stats.chunks == 40


def test_late_reply_after_timeout_is_never_returned(serve, clients) -> None:
    srv = serve(EchoPolicy(delay_s=0.3))
    c = clients(srv)
    c.request(obs(0.1), 0, 0)
    assert c.poll(0.05) is None
    c.cancel()  # given up: its reply will arrive and must be dropped
    rid2 = c.request(obs(0.2), 0, 1)
    deadline = time.monotonic() + 5
    reply = None
    while reply is None and time.monotonic() < deadline:
        reply = c.poll(0.1)
    assert isinstance(reply, P.Chunk) and reply.request_id == rid2 and reply.start_step == 1
    np.testing.assert_allclose(reply.actions, 0.2)
    assert c.stats.stale_dropped == 1


def test_a_newer_observation_beyond_max_inflight_supersedes_the_oldest_queued(serve) -> None:
    policy = GatedPolicy()
    srv = serve(policy, max_inflight=2)
    raw = Raw(srv.address)
    replies: list[P.Message] = []
    try:
        assert isinstance(raw.send(P.encode(driver_spec().hello("raw"))), P.Welcome)
        raw.sock.send(P.encode(P.Observation(1, 0, 1, 0.0, obs(1.0))))
        assert policy.next_in() == 1.0  # 1 is in inference (held by the gate) before 2..4 arrive
        for rid in (2, 3, 4):  # 2 and 3 wait (a pipeline of 2), 4 replaces 2
            raw.sock.send(P.encode(P.Observation(rid, 0, rid, 0.0, obs(float(rid)))))
        # the server reads one peer's messages in order: the echo of a heartbeat sent after 4 proves
        # that 2..4 were all queued (or superseded) while 1 was still held
        raw.sock.send(P.encode(P.Heartbeat(77, 0.0)))
        while raw.sock.poll(30_000):
            m = P.decode(raw.sock.recv())
            if isinstance(m, P.Heartbeat) and m.seq == 77:
                break
            replies.append(m)
        else:
            raise AssertionError("no heartbeat echo")
        for _ in range(3):
            policy.gate.release()
        assert [policy.next_in() for _ in range(2)] == [3.0, 4.0]  # computed in the order sent
        while len(replies) < 4 and raw.sock.poll(30_000):
            replies.append(P.decode(raw.sock.recv()))
    finally:
        for _ in range(4):
            policy.gate.release()
        raw.close()
    kinds = [(type(r).__name__, r.request_id) for r in replies]
    assert sorted(kinds) == [("Chunk", 1), ("Chunk", 3), ("Chunk", 4), ("Error", 2)]
    assert [rid for kind, rid in kinds if kind == "Chunk"] == [1, 3, 4]


def test_max_clients(serve, clients) -> None:
    srv = serve(max_clients=1)
    clients(srv)
    with pytest.raises(HandshakeError) as e:
        clients(srv, connect=False).connect(3.0)
    assert e.value.error is not None and e.value.error.code == P.ErrorCode.TOO_MANY_CLIENTS


def test_driver_reconnects_after_server_restart(serve, clients) -> None:
    first = serve()
    address = first.address  # same port for the restarted server
    c = clients(first)
    _, r1 = ask(c, obs(0.1))
    assert isinstance(r1, P.Chunk)
    first.stop()
    second = serve(bind=address)
    got, deadline = None, time.monotonic() + 8
    while not isinstance(got, P.Chunk) and time.monotonic() < deadline:
        rid = c.request(obs(0.3), 0, 5)
        got = c.poll(0.3) if rid is not None else c.poll(0.05)
        if rid is not None and got is None:
            c.cancel(timed_out=True)
    assert isinstance(got, P.Chunk) and got.start_step == 5
    assert second.stats.chunks >= 1 and c.stats.reconnects >= 1


def test_remote_bind_needs_opt_in() -> None:
    with pytest.raises(ValueError, match="allow_remote"):
        ControlServer(HoldPolicy(spec()), "tcp://0.0.0.0:5999")
