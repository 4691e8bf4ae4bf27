"""``drive learner_wait``: the robot holds at its reset while the learner owes too many updates.

A real server with its learner port, a real learner link client reporting how far behind it is
(``ack.behind``), and a driver-side client reading the relay in the server's heartbeat echoes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qc_robot import protocol as P
from qc_robot.cli import compose
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.drive import build_driver
from qc_robot.drivers.learner_pace import LearnerPace
from qc_robot.finetune.client import LearnerClient
from qc_robot.policies.scripted import HoldPolicy, simple_spec
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[ControlServer, LearnerLink, PolicyClient, object]]:
    link = LearnerLink(f"ipc://{tmp_path / 'learner.ipc'}", Journal(str(tmp_path / "journal")), heartbeat_s=0.05)
    srv = ControlServer(HoldPolicy(simple_spec(10, 5, 5)), "tcp://127.0.0.1:*", learner_link=link).start()
    driver = build_driver(compose("drive", ["driver=mock"]))
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("mock"), outbox=None)
    client.connect(10.0)
    yield srv, link, client, driver
    client.close()
    driver.close()
    srv.stop()


def _learner(link: LearnerLink, behind: int) -> LearnerClient:
    """A learner subscribed to the server that reports ``behind``, once the server has heard it."""
    learner = LearnerClient(link.address, heartbeat_s=0.05, timeout_s=30.0)
    learner.behind = behind
    learner.start()
    ev = threading.Event()
    for _ in range(3000):  # a bounded poll for the link's thread, no assumed delay
        if link.learner_behind() == behind:
            return learner
        ev.wait(0.01)
    raise AssertionError(f"the server never heard the learner's figure (it says {link.learner_behind()})")


def test_the_robot_waits_while_the_learner_is_behind_and_goes_on_when_it_catches_up(rig):
    srv, link, client, driver = rig
    learner = _learner(link, 500)
    words: list[int] = []
    heard = threading.Event()

    def on_word(behind: int) -> None:
        words.append(behind)
        if len(words) >= 3:
            heard.set()

    pace = LearnerPace(client, driver, limit=100, max_s=0.0, period_s=0.01, on_word=on_word)
    waited: list[float] = []
    t = threading.Thread(target=lambda: waited.append(pace()))
    try:
        t.start()
        assert heard.wait(60), "the robot asked the server"
        assert t.is_alive() and words[:3] == [500, 500, 500], "500 owed > 100: the robot holds"
        learner.behind = 0  # the learner caught up
        t.join(60)
        assert not t.is_alive()
    finally:
        learner.behind = 0
        t.join(60)
        learner.close()
    assert words[-1] == 0 and all(w == 500 for w in words[:-1])
    assert waited[0] > 0 and pace.waits == 1 and pace.wait_s == waited[0] and pace.gave_up == 0


def test_no_learner_or_one_keeping_up_costs_no_wait(rig):
    srv, link, client, driver = rig
    words: list[int] = []
    pace = LearnerPace(client, driver, limit=100, max_s=0.0, period_s=0.01, on_word=words.append)
    assert pace() == 0.0 and words == [-1]  # the server has no learner
    learner = _learner(link, 100)  # at the limit, not beyond it
    try:
        assert pace() == 0.0 and words[-1] == 100 and pace.waits == 0
    finally:
        learner.close()


def test_a_wait_is_cut_at_its_cap_and_counted(rig):
    srv, link, client, driver = rig
    learner = _learner(link, 10_000)
    try:
        pace = LearnerPace(client, driver, limit=100, max_s=0.05, period_s=0.01)
        assert pace() >= 0.05 and pace.gave_up == 1 and pace.waits == 1
    finally:
        learner.close()


def test_the_figures_travel_as_optional_fields():
    """Older peers omit them: a heartbeat without ``learner_behind`` reads as 'no learner'."""
    hb = P.decode(P.encode(P.Heartbeat(3, 1.0)))
    assert isinstance(hb, P.Heartbeat) and hb.learner_behind == -1
    ack = P.decode(P.encode(P.Ack(7, 5, behind=321)))
    assert isinstance(ack, P.Ack) and ack.behind == 321
    import msgpack

    old = msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "ack", "seq": 7})
    assert P.decode(old).behind == 0  # type: ignore[union-attr]


def test_heartbeat_echoes_nobody_waits_for_are_not_kept(rig):
    """A driver pings on every idle heartbeat interval for hours: the echoes it never reads must
    not pile up."""
    srv, link, client, driver = rig
    for _ in range(200):
        client.ping()  # no wait: the echo arrives later, unread
        client.poll(0.001)
    assert client.ping(timeout_s=30.0) is not None  # a ping that waits still gets its round trip
    assert len(client._pong) <= 8


def test_a_wait_longer_than_an_episode_leaves_the_next_episode_whole():
    """The sim's episode clock starts at its reset: a wait after it would hold through the
    episode's time limit and start it already over (seen in a 30-minute arm: 0-step 'failures')."""
    import numpy as np
    from episode_rig import ScriptedActions

    from qc_robot.drivers.registry import make_safe_driver
    from qc_robot.drivers.runner import run_episode
    from qc_robot.drivers.sim import SimConfig

    pytest.importorskip("ogbench")
    limit = 10
    driver = make_safe_driver("sim", SimConfig(env="cube-single-task1", realtime=True, time_scale=4.0,
                                               max_episode_steps=limit))
    period = 1.0 / (driver.spec.control_hz * 4.0)
    waits: list[float] = []

    def learner_wait() -> float:  # a learner behind for three episodes' worth of robot time
        threading.Event().wait(3 * limit * period)
        waits.append(3 * limit * period)
        return waits[-1]

    try:
        zero = np.zeros(driver.spec.action_dim, np.float32)
        res = run_episode(driver, ScriptedActions(lambda step: zero), 0, 0,  # type: ignore[arg-type]
                          learner_wait=learner_wait, stall_timeout_s=30.0)
    finally:
        driver.close()
    assert waits and res.learner_wait_s == waits[0]
    # the robot ran the whole episode (a wait after the reset left it 0 steps); the loop's own tick
    # count may fall short of the robot's under load, which is why rows are not compared exactly
    assert res.robot_steps == limit and res.rows >= 1, res


def test_holding_for_the_learner_trips_no_watchdog(rig):
    """The wait comes right after an episode whose actions armed the watchdog: holding on purpose
    for longer than ``watchdog_s`` is no missing action (seen as one trip per wait in an arm)."""
    import numpy as np

    from qc_robot.drivers.registry import make_safe_driver
    from qc_robot.drivers.sim import SimConfig

    pytest.importorskip("ogbench")
    srv, link, client, _ = rig
    sim = make_safe_driver("sim", SimConfig(env="cube-single-task1", realtime=True))
    learner = _learner(link, 500)
    period = 0.05
    words: list[int] = []

    def on_word(behind: int) -> None:  # pay the backlog after 2 x watchdog_s of held periods
        words.append(behind)
        if len(words) * period > 2 * sim.cfg.watchdog_s:
            learner.behind = 0

    try:
        sim.reset(0)
        sim.act(np.zeros(sim.spec.action_dim, np.float32))  # the last episode's action: the watchdog is armed
        pace = LearnerPace(client, sim, limit=100, max_s=0.0, period_s=period, on_word=on_word)
        assert pace() > sim.cfg.watchdog_s
        assert sim.stats.trips == 0 and sim.end_reason is None and sim.stats.held >= len(words) - 1
    finally:
        learner.behind = 0
        learner.close()
        sim.close()
