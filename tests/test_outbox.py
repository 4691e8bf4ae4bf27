"""The robot-side outbox: transitions made while the server is down reach the learner exactly once,
in order, after the server restarts (SIGKILL, same journal); the outbox survives a driver restart."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from test_finetune_link import ACT, OBS, free_port, kill, spawn, transition, wait_until

from qc_robot import protocol as P
from qc_robot.drivers.base import DriverSpec
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.outbox import Outbox
from qc_robot.finetune.client import LearnerClient, Record
from qc_robot.policies.base import ObsField


def _client(addr: str, box: Outbox) -> PolicyClient:
    ds = DriverSpec([ObsField("state", (OBS,), "float32")], ACT, -np.ones(ACT), np.ones(ACT), 20.0)
    c = PolicyClient(addr, ds.hello("test"), outbox=box)
    c.connect(10.0)
    return c


def _produce(c: PolicyClient, ids: range) -> None:
    """What the control loop does: a transition per chunk, the client ticked in between."""
    for i in ids:
        assert c.send_transition(transition(i))  # always taken: it is on disk first
        for _ in range(3):
            c.heartbeat()
            c.poll(0.005)


def _once_in_order(records: list[Record]) -> list[Record]:
    """The learner's rule (``Finetuner.apply``): an outbox entry at or below the newest applied is
    a re-delivery."""
    out, last = [], 0
    for r in records:
        if r.transition.outbox_seq > last:
            out.append(r)
            last = r.transition.outbox_seq
    return out


def test_outbox_delivers_exactly_once_in_order_across_a_server_restart(tmp_path: Path) -> None:
    dport, lport, journal = free_port(), free_port(), str(tmp_path / "journal")
    addr = f"tcp://127.0.0.1:{dport}"
    srv = spawn("server", str(dport), str(lport), journal)
    learner = c = None
    box = Outbox(tmp_path / "outbox", resend_s=0.5, window=8)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        learner = LearnerClient(f"tcp://127.0.0.1:{lport}", 1, heartbeat_s=0.2, timeout_s=1.5).start()
        c = _client(addr, box)
        _produce(c, range(0, 20))
        wait_until(lambda: (c.heartbeat(), c.poll(0.01), box.acked)[2] >= 20, 10, "acks for the first 20")
        kill(srv)  # SIGKILL while the robot keeps producing
        _produce(c, range(20, 45))
        assert box.pending == 25 and box.acked == 20  # kept on disk, unacknowledged
        srv = spawn("server", str(dport), str(lport), journal)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        _produce(c, range(45, 50))  # the client finds the new server by itself (no_session → hello)
        wait_until(lambda: (c.heartbeat(), c.poll(0.01), box.pending)[2] == 0, 20, "the outbox to drain")
        _produce(c, range(50, 51))  # 50: a sentinel journaled after every earlier entry (and re-send)
        got: list[Record] = []
        deadline = time.monotonic() + 120  # hang guard
        while not any(r.transition.start_step == 50 for r in got) and time.monotonic() < deadline:
            c.heartbeat()
            c.poll(0.01)
            got += learner.get(0.1)
    finally:
        kill(srv)
        if learner is not None:
            learner.close()
        if c is not None:
            c.close()
        box.close()
    applied = _once_in_order(got)
    assert [r.transition.start_step for r in applied] == list(range(51))  # nothing lost, in order
    assert [r.transition.outbox_seq for r in applied] == list(range(1, 52))
    assert {r.transition.outbox for r in got} == {box.id}
    assert [r.seq for r in got] == list(range(1, len(got) + 1))  # the journal kept numbering
    for r in applied:  # the payload is the transition the robot made, byte for byte in its arrays
        want = transition(r.transition.start_step)
        np.testing.assert_array_equal(r.transition.obs["state"], want.obs["state"])
        np.testing.assert_array_equal(r.transition.next_obs["state"], want.next_obs["state"])
    assert c.stats.reconnects >= 1
    again = Outbox(tmp_path / "outbox")  # a restarted driver: nothing to resend, numbering goes on
    try:
        assert again.id == box.id and again.pending == 0 and again.next_seq == 52
    finally:
        again.close()


def test_outbox_survives_a_driver_restart_and_is_bounded(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob", max_bytes=4_000, segment_bytes=1_000)
    seqs = [box.put(transition(i)) for i in range(40)]  # no server: all unacknowledged
    assert seqs == list(range(1, 41))
    assert box.dropped > 0 and box.pending == 40 - box.dropped  # bounded: the oldest went first
    kept = [s for s, _ in box.due()]
    box.close()
    back = Outbox(tmp_path / "ob", max_bytes=4_000, segment_bytes=1_000, window=100)
    try:
        assert [s for s, _ in back.due()] == kept  # the same entries, from disk, in order
        first = P.decode(back.due()[0][1])
        assert isinstance(first, P.Transition) and first.outbox == back.id and first.outbox_seq == kept[0]
        back.ack(kept[-1])
        assert back.pending == 0 and back.put(transition(99)) == 41
    finally:
        back.close()
    assert len(list((tmp_path / "ob").glob("seg-*.log"))) <= 2  # acknowledged segments are deleted
