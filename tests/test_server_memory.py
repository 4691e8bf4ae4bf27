"""Bounded memory per peer (issue 31, item 2): outbox ids are bounded, scoped to the peer that
sent them and forgotten when it leaves, so a peer can neither grow the server nor make it
acknowledge another driver's transitions without recording them. Real sockets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import test_server
import zmq
from test_server import ACT, OBS, Raw, driver_spec

from qc_robot import protocol as P
from qc_robot.server.learner_link import CurveKeys, make_keys

serve = test_server.serve


def _transition(step: int, outbox: str, seq: int, act: int = ACT) -> bytes:
    k = np.zeros((1, OBS), np.float32)
    return P.encode(P.Transition(0, step, {"state": k}, np.zeros((1, act), np.float32), np.zeros(1, np.float32),
                                 np.zeros(1, bool), np.zeros(1, bool), {"state": k}, outbox=outbox,
                                 outbox_seq=seq))


def _sync(raw: Raw, seq: int) -> list[P.Message]:
    """Every message ``raw`` sent before has been handled: the replies to them."""
    raw.sock.send(P.encode(P.Heartbeat(seq, 0.0)))
    replies = []
    while raw.sock.poll(60_000):
        m = P.decode(raw.sock.recv())
        if isinstance(m, P.Heartbeat) and m.seq == seq:
            return replies
        replies.append(m)
    raise AssertionError("no heartbeat echo")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_refused_transitions_with_maximal_outbox_ids_leave_memory_bounded(serve) -> None:
    srv = serve()  # in this process: its RSS is the server's
    raw = Raw(srv.address)
    try:
        assert isinstance(raw.send(P.encode(driver_spec().hello("ids"))), P.Welcome)
        _sync(raw, 1)
        before = _rss_bytes()
        for batch in range(50):  # 10,000 refused transitions (wrong action width), each a new id
            for i in range(200):
                n = batch * 200 + i
                long_id = n % 2 == 0  # half at the limit, half far over it
                outbox = f"{n:064d}" if not long_id else f"{n:d}" * (16384 // len(str(n)) + 1)
                raw.sock.send(_transition(n, outbox, 1, act=ACT + 1))
            replies = _sync(raw, 2 + batch)  # within the server's send buffer
            assert all(isinstance(m, P.Ack | P.Error) for m in replies)
        grown = _rss_bytes() - before
        assert grown < 40 << 20, f"RSS grew {grown / 2**20:.0f} MiB over 10,000 refused transitions"
        held = srv.held()
        assert held["outbox_ids"] <= 4 and held["outbox_id_chars"] <= 4 * P.MAX_OUTBOX_ID, held
        # every one refused (at least: the suite's other tests' clients may reach a reused port too)
        assert srv.stats.errors.get(P.ErrorCode.BAD_TRANSITION, 0) >= 10_000
        raw.sock.send(P.encode(P.Bye("done")))
        _sync(raw, 99)
        held = srv.held()
    finally:
        raw.close()
    gone = {k: held[k] for k in ("sessions", "queued_observations", "last_chunks", "scheduler_tags", "outbox_ids",
                                 "open_episodes")}
    assert set(gone.values()) == {0}, f"kept after the peer left: {gone}"


def test_an_outbox_id_reused_by_another_peer_suppresses_nothing(serve) -> None:
    srv = serve()
    robot, intruder = Raw(srv.address), Raw(srv.address)
    try:
        for r, name in ((robot, "robot"), (intruder, "intruder")):
            assert isinstance(r.send(P.encode(driver_spec().hello(name))), P.Welcome)
        for seq in (1, 2):
            assert robot.send(_transition(seq, "robot-outbox", seq)) == P.Ack(seq)
        # the intruder learned the id: a refused and an accepted transition, far ahead in seq
        intruder.sock.send(_transition(0, "robot-outbox", 10**6, act=ACT + 1))
        intruder.sock.send(_transition(1, "robot-outbox", 10**6 + 1))
        replies = _sync(intruder, 1)
        assert P.Ack(10**6 + 1) in replies
        recorded = srv.stats.transitions
        assert robot.send(_transition(3, "robot-outbox", 3)) == P.Ack(3)
        assert srv.stats.transitions == recorded + 1, "the robot's transition was acknowledged, not recorded"
        assert robot.send(_transition(3, "robot-outbox", 3)) == P.Ack(3)  # its own re-send: once
        assert srv.stats.transitions == recorded + 1
    finally:
        robot.close()
        intruder.close()


class CurvePeer(Raw):
    def __init__(self, address: str, keys: CurveKeys) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        keys.apply(self.sock, server=False)
        self.sock.connect(address)


def test_with_curve_an_outbox_id_belongs_to_its_drivers_key(serve, tmp_path: Path) -> None:
    """Authenticated drivers: another key's transitions under a held id are refused without an
    ack (never journaled, where a learner would take them for the owner's); the same key on a new
    connection (a restarted driver) carries on at once; a released id is free again."""
    keys = {n: make_keys(str(tmp_path / n), n) for n in ("server", "robot", "intruder")}
    (tmp_path / "authorized").mkdir()
    for n in ("robot", "intruder"):
        shutil.copy(keys[n][0], tmp_path / "authorized")
    srv = serve(curve=CurveKeys.from_files(keys["server"][1], authorized_dir=str(tmp_path / "authorized")))
    client = {n: CurveKeys.from_files(keys[n][1], keys["server"][0]) for n in ("robot", "intruder")}
    robot, intruder = CurvePeer(srv.address, client["robot"]), CurvePeer(srv.address, client["intruder"])
    restarted = None
    try:
        for r in (robot, intruder):
            assert isinstance(r.send(P.encode(driver_spec().hello("d"))), P.Welcome)
        assert robot.send(_transition(1, "robot-outbox", 1)) == P.Ack(1)
        intruder.sock.send(_transition(0, "robot-outbox", 10**6, act=ACT + 1))
        intruder.sock.send(_transition(1, "robot-outbox", 10**6 + 1))
        replies = _sync(intruder, 1)
        assert [m.code for m in replies] == [P.ErrorCode.BAD_TRANSITION] * 2 and "another key" in replies[0].message
        assert srv.stats.transitions == 1  # nothing of the intruder's recorded or acknowledged
        restarted = CurvePeer(srv.address, client["robot"])  # the robot again; its old connection lingers
        assert isinstance(restarted.send(P.encode(driver_spec().hello("d"))), P.Welcome)
        assert restarted.send(_transition(2, "robot-outbox", 2)) == P.Ack(2)
        for r in (robot, restarted):
            r.sock.send(P.encode(P.Bye("done")))
            _sync(r, 2)
        assert intruder.send(_transition(2, "robot-outbox", 10**6 + 2)) == P.Ack(10**6 + 2)  # free once both left
        assert srv.stats.transitions == 3
    finally:
        for r in (robot, intruder, restarted):
            if r is not None:
                r.close()
