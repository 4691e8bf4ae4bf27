"""Bounded memory per peer (issue 31, item 2): outbox ids are bounded, scoped to the peer that
sent them and forgotten when it leaves, so a peer can neither grow the server nor make it
acknowledge another driver's transitions without recording them. Real sockets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import test_server
from test_server import ACT, OBS, Raw, driver_spec

from qc_robot import protocol as P

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
        assert srv.stats.errors.get(P.ErrorCode.BAD_TRANSITION) == 10_000
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
        recorded = srv.stats.transitions
        # the intruder learned the id: a refused and a valid transition, far ahead in seq
        intruder.sock.send(_transition(0, "robot-outbox", 10**6, act=ACT + 1))
        intruder.sock.send(_transition(1, "robot-outbox", 10**6 + 1))
        replies = _sync(intruder, 1)
        assert not any(isinstance(m, P.Ack) for m in replies), replies  # nothing recorded, nothing acknowledged
        assert [m.code for m in replies] == [P.ErrorCode.BAD_TRANSITION] * 2 and "in use" in replies[0].message
        assert srv.stats.transitions == recorded
        assert robot.send(_transition(3, "robot-outbox", 3)) == P.Ack(3)
        assert srv.stats.transitions == recorded + 1, "the robot's transition was acknowledged, not recorded"
        assert robot.send(_transition(3, "robot-outbox", 3)) == P.Ack(3)  # its own re-send: once
        assert srv.stats.transitions == recorded + 1
        robot.sock.send(P.encode(P.Bye("done")))
        _sync(robot, 2)
        assert intruder.send(_transition(2, "robot-outbox", 10**6 + 2)) == P.Ack(10**6 + 2)  # free once it left
    finally:
        robot.close()
        intruder.close()
