"""Fair inference across sessions (issue 31, item 3): a session that floods valid observations
cannot hold the inference worker while another asks at its control rate. Ordered by a gated
policy (which observation enters inference when), not by the clock."""

from __future__ import annotations

import threading
import time

import numpy as np
import test_server
from test_server import GatedPolicy, Raw, driver_spec

from qc_robot import protocol as P
from qc_robot.server.scheduler import FairScheduler

serve = test_server.serve


def _obs(value: float, rid: int) -> bytes:
    o = np.zeros(4, np.float32)
    o[0] = value
    return P.encode(P.Observation(rid, 0, rid, 0.0, {"state": o}))


def _queued(raw: Raw, data: bytes, seq: int) -> None:
    """Send an observation and wait until the server has queued it (its loop handles one peer's
    messages in order, so the echo of a heartbeat sent after it proves it)."""
    raw.sock.send(data)
    reply = raw.send(P.encode(P.Heartbeat(seq, 0.0)))
    assert isinstance(reply, P.Heartbeat) and reply.seq == seq, reply


def _chunk(raw: Raw) -> P.Message:
    assert raw.sock.poll(30_000), "no reply"
    return P.decode(raw.sock.recv())


def test_a_driver_joining_a_flood_is_served_after_the_inference_in_progress(serve) -> None:
    policy = GatedPolicy()
    srv = serve(policy, workers=1)
    names = {"flood-a": 1.0, "flood-b": 2.0, "flood-c": 3.0, "driver": 9.0}
    peers = {n: Raw(srv.address) for n in names}
    try:
        for n, r in peers.items():
            assert isinstance(r.send(P.encode(driver_spec().hello(n))), P.Welcome)
        flooders = [n for n in names if n.startswith("flood")]
        for rid in (1, 2):  # the flooders have been served before: they have a history
            for n in flooders:
                peers[n].sock.send(_obs(names[n], rid))
                assert policy.next_in() == names[n]
                policy.gate.release()
                assert isinstance(_chunk(peers[n]), P.Chunk)
        peers["flood-a"].sock.send(_obs(1.0, 3))
        assert policy.next_in() == 1.0  # in inference, held by the gate
        _queued(peers["flood-b"], _obs(2.0, 3), 100)
        _queued(peers["flood-c"], _obs(3.0, 3), 101)
        _queued(peers["driver"], _obs(9.0, 1), 102)  # queued last, behind two flooders
        policy.gate.release()
        assert policy.next_in() == 9.0, "the driver waited behind flooders queued before it"
        for _ in range(3):
            policy.gate.release()
        rest = sorted(policy.next_in() for _ in range(2))
        assert rest == [2.0, 3.0]  # the flooders are answered too, in their turn
        for n in names:
            assert isinstance(_chunk(peers[n]), P.Chunk)
    finally:
        for _ in range(8):
            policy.gate.release()
        for r in peers.values():
            r.close()


def test_a_session_at_its_rate_waits_for_at_most_one_job_whatever_the_others_queue() -> None:
    """The scheduler alone, with known costs: three sessions always have an observation queued
    (each job 1 unit); a driver asks every 10 units (jobs of 2 units). Whenever it asks, its job is
    the next one taken, and the flooders share the rest equally."""
    sched: FairScheduler[str, int] = FairScheduler()
    cost = {"a": 1.0, "b": 1.0, "c": 1.0, "driver": 2.0}
    served = dict.fromkeys(cost, 0)
    for k in "abc":
        sched.put(k, 0)
    for t in range(300):
        if t % 10 == 0:
            sched.put("driver", t)
        item = sched.get()
        assert item is not None
        key, _ = item
        if t % 10 == 0 and t:  # (at the start nobody has a history: a tie)
            assert key == "driver", f"at job {t} the driver waited behind {key!r}"
        served[key] += 1
        sched.charge(key, cost[key])
        if key != "driver":
            sched.put(key, t)  # a flooder re-queues at once
    assert served["driver"] == 30
    assert max(served[k] for k in "abc") - min(served[k] for k in "abc") <= 1
    sched.close()
    assert sched.get() is None


def test_the_scheduler_forgets_a_dropped_session() -> None:
    sched: FairScheduler[str, int] = FairScheduler()
    assert sched.put("a", 1) is None and sched.put("a", 2) == 1  # newest supersedes
    sched.drop("a")
    assert len(sched) == 0 and sched.tags() == 0
    done = threading.Event()

    def take() -> None:
        assert sched.get() is None
        done.set()

    t = threading.Thread(target=take)
    t.start()
    sched.close()
    assert done.wait(30)
    t.join(30)


def test_a_session_holds_at_most_one_worker() -> None:
    """Two workers, one flooding session: its next observation waits for its running one, so the
    other worker is free for a driver the moment it asks, even a driver that has had more
    inference time so far (by tags alone the flooder would go first)."""
    sched: FairScheduler[str, int] = FairScheduler()
    sched.put("driver", 0)
    assert sched.get() == ("driver", 0)
    sched.charge("driver", 100.0)
    sched.put("flood", 1)
    assert sched.get() == ("flood", 1)  # worker 1 runs it
    sched.put("flood", 2)
    sched.put("driver", 7)
    assert sched.get() == ("driver", 7), "the flooder's second job took the other worker"
    sched.charge("flood", 1.0)  # worker 1 done: the flooder's next job may run
    assert sched.get() == ("flood", 2)
    sched.close()


def test_a_peer_flooding_observations_is_dropped_unread_and_heard_again_once_quiet(serve) -> None:
    from qc_robot.server.admission import FloodGuard

    policy = GatedPolicy()
    srv = serve(policy, workers=1, flood_guard=FloodGuard(burst=5, rate=2.0))
    flooder, driver = Raw(srv.address), Raw(srv.address)
    try:
        for r, name in ((flooder, "flooder"), (driver, "driver")):
            assert isinstance(r.send(P.encode(driver_spec().hello(name))), P.Welcome)
        flooder.sock.send(_obs(1.0, 1))
        assert policy.next_in() == 1.0  # in inference: every later observation supersedes the queued one
        seen, t0 = srv.stats.received + srv.stats.flood_dropped, time.monotonic()
        for rid in range(2, 202):
            flooder.sock.send(_obs(1.0, rid))
        deadline = time.monotonic() + 60
        while srv.stats.received + srv.stats.flood_dropped < seen + 200 and time.monotonic() < deadline:
            flooder.sock.poll(10)  # polling the server's counters (nothing else tells when it read them)
        superseded = srv.stats.errors.get(P.ErrorCode.SUPERSEDED, 0)  # the burst, and 2/s refilled meanwhile
        assert superseded < 5 + 2 * (time.monotonic() - t0) + 1 and srv.stats.flood_dropped >= 150, \
            (superseded, srv.stats.flood_dropped)
        _queued(driver, _obs(9.0, 1), 100)  # another peer is heard all along
        for _ in range(2):
            policy.gate.release()
        assert sorted(policy.next_in() for _ in range(2)) == [1.0, 9.0]
        assert isinstance(_chunk(driver), P.Chunk)
        echoed, deadline = False, time.monotonic() + 60
        while not echoed and time.monotonic() < deadline:  # quiet now: heard again (tokens refill)
            flooder.sock.send(P.encode(P.Heartbeat(7, 0.0)))
            while not echoed and flooder.sock.poll(200):
                m = P.decode(flooder.sock.recv())
                echoed = isinstance(m, P.Heartbeat) and m.seq == 7
        assert echoed, "the flooder was never heard again"
    finally:
        for _ in range(8):
            policy.gate.release()
        flooder.close()
        driver.close()
