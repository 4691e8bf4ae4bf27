"""The learner link over real sockets on 127.0.0.1: delivery exactly once and in order across
learner and server kills (real processes, SIGKILL), policy pushes between chunks, stale pushes,
a dead learner that never stalls the robot, CURVE. Every wait is bounded."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from qc_robot import protocol as P
from qc_robot.drivers.base import DriverSpec
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.outbox import Outbox
from qc_robot.finetune.client import LearnerClient, Record
from qc_robot.policies.base import ChunkResult, ObsField
from qc_robot.policies.scripted import simple_spec
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import CurveKeys, LearnerLink, make_keys

OBS, ACT, H = 4, 2, 3
PROCS = str(Path(__file__).resolve().parent / "finetune_procs.py")


class ConstPolicy:
    """Every action = ``value``; ``delay_s`` per chunk. With ``gate`` an inference signals
    ``started`` and then waits for the gate, so a push lands mid-inference by construction."""

    def __init__(self, value: float = 0.0, version: str = "0", delay_s: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.spec, self.value, self.delay_s = simple_spec(OBS, ACT, H, 20.0, version=version), value, delay_s
        self.gate, self.started = gate, threading.Event()

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(120), "the test never opened the gate"
        time.sleep(self.delay_s)
        return ChunkResult(np.full((H, ACT), self.value, np.float32), self.delay_s)


def const_loader(path: str, version: str) -> ConstPolicy:
    """Test 'model file' = the action value as text (within the [-1, 1] limits)."""
    return ConstPolicy(float(Path(path).read_text()), version, delay_s=0.3)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded poll. ``timeout`` only guards against a hang: at least 60 s, as a busy machine is slow."""
    deadline = time.monotonic() + max(timeout, 60.0)
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transition(i: int) -> P.Transition:
    """K=2 steps; ``start_step`` = i identifies it end to end."""
    o = np.full((2, OBS), i, np.float32)
    return P.Transition(0, i, {"state": o}, np.zeros((2, ACT), np.float32), np.zeros(2, np.float32),
                        np.zeros(2, bool), np.zeros(2, bool), {"state": o + 1}, intervention=np.array([i % 2, 0], bool))


def driver(addr: str, outbox: Outbox | None = None) -> PolicyClient:
    """A driver's client; with ``outbox`` the server acknowledges each transition once journaled."""
    ds = DriverSpec([ObsField("state", (OBS,), "float32")], ACT, -np.ones(ACT), np.ones(ACT), 20.0)
    c = PolicyClient(addr, ds.hello("test", {"outbox": outbox.id} if outbox is not None else None), outbox=outbox)
    c.connect(60.0)
    assert c.welcome is not None and c.welcome.log_transitions
    return c


def send(c: PolicyClient, ids: range) -> None:
    for i in ids:
        deadline = time.monotonic() + 60.0  # hang guard
        while not c.send_transition(transition(i)):  # not sent while (re)connecting: retry, bounded
            assert time.monotonic() < deadline, "driver could not send"
            c.poll(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., ControlServer]]:
    made: list[ControlServer] = []

    def start(policy: ConstPolicy | None = None, **link_kw: object) -> ControlServer:
        link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / f"journal{len(made)}"), heartbeat_s=0.2,
                           timeout_s=2.0, policy_loader=const_loader, **link_kw)  # type: ignore[arg-type]
        s = ControlServer(policy or ConstPolicy(), "tcp://127.0.0.1:*", learner_link=link).start()
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, PROCS, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=str(Path(PROCS).parent.parent))


def kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(5)


def applied(d: Path) -> list[str]:
    f = d / "applied.txt"
    return f.read_text().splitlines() if f.exists() else []


def test_learner_killed_and_restarted_gets_everything_exactly_once_in_order(server, tmp_path):
    s = server()
    c = driver(s.address)
    send(c, range(0, 30))  # before any learner exists: journaled
    d = tmp_path / "learner"
    d.mkdir()
    p = spawn("learner", s.link.address, str(d))
    try:
        send(c, range(30, 50))
        wait_until(lambda: len(applied(d)) >= 40, 20, "the learner to apply 40 records")
        kill(p)  # SIGKILL: lines after its last checkpoint are lost with it
        send(c, range(50, 80))  # while no learner runs: the journal absorbs them
        p = spawn("learner", s.link.address, str(d))
        send(c, range(80, 101))  # 100: a sentinel; a duplicate of an earlier one would come before it
        wait_until(lambda: any(ln.endswith(" 100") for ln in applied(d)), 20, "the sentinel after the restart")
    finally:
        kill(p)
        c.close()
    lines = applied(d)
    assert [ln.split() for ln in lines] == [[str(i + 1), str(i)] for i in range(101)]


def test_server_killed_and_restarted_resends_unacknowledged_records(tmp_path):
    dport, lport, journal = free_port(), free_port(), str(tmp_path / "journal")
    srv = spawn("server", str(dport), str(lport), journal)
    learner = None
    c = None
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        learner = LearnerClient(f"tcp://127.0.0.1:{lport}", 1, window=4, max_queued=8, heartbeat_s=0.2,
                                timeout_s=1.5).start()
        outbox = Outbox(tmp_path / "outbox")
        c = driver(f"tcp://127.0.0.1:{dport}", outbox)
        send(c, range(0, 40))
        wait_until(lambda: c.poll(0.02) is None and outbox.pending == 0, 60, "the server to journal all 40")
        wait_until(lambda: learner.stats.received >= 8, 10, "the learner's queue to fill")
        assert learner.stats.received < 40  # the learner holds back acks: its queue is full
        kill(srv)  # SIGKILL: records journaled but never streamed must come back
        srv = spawn("server", str(dport), str(lport), journal)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        got: list[Record] = []
        deadline = time.monotonic() + 120  # hang guard
        while len(got) < 40 and time.monotonic() < deadline:
            got += learner.get(0.1)
        c.close()
        c = driver(f"tcp://127.0.0.1:{dport}")  # the driver handshakes with the new server
        send(c, range(40, 61))  # 60: a sentinel; a duplicate of an earlier one would come before it
        while not any(r.transition.start_step == 60 for r in got) and time.monotonic() < deadline:
            got += learner.get(0.1)
    finally:
        kill(srv)
        if learner is not None:
            learner.close()
        if c is not None:
            c.close()
    assert [r.seq for r in got] == list(range(1, 62))
    assert [r.transition.start_step for r in got] == list(range(61))
    assert learner.stats.reconnects >= 1


def test_push_is_applied_between_chunks_and_versions_only_increase(server):
    gate = threading.Event()
    old = ConstPolicy(0.1, "0", gate=gate)
    s = server(old)
    learner = LearnerClient(s.link.address, 1, heartbeat_s=0.2).start()
    c = driver(s.address)
    try:
        assert learner.subscribed.wait(60)
        obs = {"state": np.zeros(OBS, np.float32)}
        rid = c.request(obs, 0, 0)
        assert old.started.wait(60)  # chunk 1 is being computed by version 0 now (held at the gate)
        ack = learner.push_policy(1, b"0.2", timeout_s=60)
        assert ack is not None and ack.accepted and s.policy_version == 1
        gate.set()
        first = c.poll(60.0)
        assert isinstance(first, P.Chunk) and first.request_id == rid
        assert first.policy_version == "0" and np.allclose(first.actions, 0.1)  # whole chunk from the old policy
        c.request(obs, 0, H)
        second = c.poll(5.0)
        assert isinstance(second, P.Chunk) and second.policy_version == "1" and np.allclose(second.actions, 0.2)
        for stale in (1, 0):  # version <= served: refused, and nothing changes
            ack = learner.push_policy(stale, b"0.9", timeout_s=5)
            assert ack is not None and not ack.accepted and "stale" in ack.reason
        assert s.policy_version == 1
        ack = learner.push_policy(3, b"0.3", timeout_s=5)
        assert ack is not None and ack.accepted
        c.request(obs, 0, 2 * H)
        third = c.poll(5.0)
        assert isinstance(third, P.Chunk) and third.policy_version == "3" and np.allclose(third.actions, 0.3)
        # the transitions a driver sends are stamped with the version that produced its chunk
        c.send_transition(transition(7))
        got = []
        wait_until(lambda: bool(got.extend(learner.get(0.05)) or got), 5, "the transition")
        assert got[0].policy_version == "3"
    finally:
        learner.close()
        c.close()


def test_corrupt_push_is_refused(server):
    s = server()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(s.link.address)
    try:
        sock.send(P.encode(P.PolicyPush(5, b"1.0", hashlib.sha256(b"other").hexdigest())))
        assert sock.poll(5000)
        ack = P.decode(sock.recv())
        assert isinstance(ack, P.PolicyAck) and not ack.accepted and "sha256" in ack.reason
        assert s.policy_version == 0
    finally:
        sock.close(0)


def test_killed_learner_never_stalls_the_control_loop(server, tmp_path):
    s = server()
    c = driver(s.address)
    d = tmp_path / "learner"
    d.mkdir()
    obs = {"state": np.zeros(OBS, np.float32)}

    def loop(ticks: range) -> list[float]:
        """A 20 Hz control loop: one request and one transition per tick; the round trips."""
        rtts = []
        for i in ticks:
            t = time.monotonic()
            c.request(obs, 0, i)
            reply = c.poll(60.0)  # hang guard: a loop stalled for good never gets its chunk
            assert isinstance(reply, P.Chunk), f"tick {i}: no chunk ({reply})"
            rtts.append(time.monotonic() - t)
            assert c.send_transition(transition(i))
            time.sleep(max(0.0, t + 0.05 - time.monotonic()))  # the loop's pace, not a synchronisation
        return rtts

    baseline = loop(range(0, 20))  # no learner yet: the same machine, the same load
    p = spawn("learner", s.link.address, str(d))
    try:
        wait_until(lambda: bool(s.link._subs), 10, "the learner to subscribe")
        kill(p)
        rtts = loop(range(20, 80))
    finally:
        kill(p)
        c.close()
    # A server that waited on the dead learner would stall a tick for its whole timeout (2 s, the
    # fixture's); load alone moves the round trips together with the baseline's.
    assert max(rtts) < max(2.0, 10 * max(baseline)), (max(rtts), max(baseline))
    assert float(np.median(rtts)) <= 4 * float(np.median(baseline)) + 0.02, (np.median(rtts), np.median(baseline))
    wait_until(lambda: s.link.journal.next_seq == 81, 5, "every transition journaled")
    wait_until(lambda: not s.link._subs, 5, "the dead learner to be unsubscribed")


def test_curve_is_required_off_loopback_and_works_with_keys(tmp_path):
    j = Journal(tmp_path / "j")
    for bind in ("tcp://0.0.0.0:5999", "tcp://192.168.1.10:5556"):
        with pytest.raises(ValueError, match="CURVE"):
            LearnerLink(bind, j)
    server_pub, server_sec = make_keys(str(tmp_path / "server"), "server")
    learner_pub, learner_sec = make_keys(str(tmp_path / "learner"), "learner")
    _, intruder_sec = make_keys(str(tmp_path / "intruder"), "intruder")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "learner.key").write_bytes(Path(learner_pub).read_bytes())
    with pytest.raises(ValueError, match="CURVE"):  # keys without an allow-list are not enough off loopback
        LearnerLink("tcp://0.0.0.0:5999", j, curve=CurveKeys.from_files(server_sec))
    keys = CurveKeys.from_files(server_sec, authorized_dir=str(authorized))
    link = LearnerLink("tcp://127.0.0.1:*", j, curve=keys, heartbeat_s=0.2).start()
    good = LearnerClient(link.address, 1, curve=CurveKeys.from_files(learner_sec, server_pub)).start()
    bad = LearnerClient(link.address, 1, curve=CurveKeys.from_files(intruder_sec, server_pub)).start()
    try:
        link.record("s", "test", "0", P.encode(transition(3)))
        assert good.subscribed.wait(5)
        recs = []
        wait_until(lambda: bool(recs.extend(good.get(0.05)) or recs), 5, "the record over CURVE")
        assert recs[0].seq == 1 and recs[0].transition.start_step == 3
        assert not bad.subscribed.is_set() and bad.stats.received == 0  # ZAP refused the unknown key
    finally:
        good.close()
        bad.close()
        link.stop()
