"""Fine-tuning across restarts (issue 25): episode identity survives a killed ``drive``, the
learner's derived files agree with its checkpoint after a crash, and every transition carries
the policy version that acted, re-sent ones included. Real ZeroMQ servers and journals, a real
``drive`` process killed with SIGKILL, real outboxes, real checkpoints."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_finetune_link import kill, wait_until

from qc_robot import protocol as P
from qc_robot.cli import compose
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.drive import build_driver, run_drive
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.outbox import Outbox
from qc_robot.drivers.runner import run_episode
from qc_robot.finetune.client import _record
from qc_robot.finetune.episodes import EpisodeAssembler
from qc_robot.policies.scripted import HoldPolicy, simple_spec
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink

OBS, ACT, H = 10, 5, 5  # the mock arm


def _serve(tmp: Path, name: str, version: str) -> tuple[ControlServer, Journal]:
    journal = Journal(str(tmp / f"journal-{name}"))
    link = LearnerLink(f"ipc://{tmp / f'{name}.ipc'}", journal)
    policy = HoldPolicy(simple_spec(OBS, ACT, H, version=version), hold=[0.5, 0, 0, 0, 0])
    return ControlServer(policy, "tcp://127.0.0.1:*", learner_link=link).start(), journal


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlServer, Journal]]:
    srv, journal = _serve(tmp_path, "a", "5")
    yield srv, journal
    srv.stop()


def _journal(journal: Journal) -> list:
    return [_record(raw) for raw in journal.read(1, max_records=100_000)]


def _rows(journal: Journal) -> int:
    return sum(len(r.transition.actions) for r in _journal(journal))


def test_a_drive_killed_mid_episode_and_restarted_never_glues_two_episodes(server, tmp_path):
    srv, journal = server
    outbox = tmp_path / "outbox"
    args = ["driver=mock", f"server={srv.address}", f"outbox_dir={outbox}", "episodes=1", "send_transitions=true"]
    first = subprocess.Popen([sys.executable, "-m", "qc_robot.cli", "drive", *args, "max_steps=100000",
                              "++driver_args.max_episode_steps=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _rows(journal) >= 30, 60, "30 journaled steps of the first drive")
    finally:
        kill(first)  # SIGKILL, mid-episode: its episode never ends
    cut = _rows(journal)
    assert run_drive(compose("drive", [*args, "max_steps=20"])) == 0  # the same robot, same outbox
    wait_until(lambda: _rows(journal) >= cut + 20, 60, "the restarted drive's steps")
    records, last = [], 0
    for r in _journal(journal):  # the learner's rule (Finetuner.apply): an outbox re-delivery is applied once
        if r.transition.outbox_seq > last:
            records.append(r)
            last = r.transition.outbox_seq
    ids = [r.transition.episode_id for r in records]
    assert ids[0] == 0 and ids[-1] >= 1, "the restarted drive numbers its episodes after the cut one"
    assembler = EpisodeAssembler(["state"], OBS)
    done = [ep for r in records for ep in assembler.add(r.seq, r.transition.outbox, r.policy_version, r.transition)]
    first_rows = sum(len(r.transition.actions) for r in records if r.transition.episode_id == 0)
    assert first_rows >= cut  # the outbox delivered what the killed process had left unacknowledged
    assert [ep.length for ep in done] == [first_rows, 20]  # the new episode ended (truncated at 20 steps)
    cut_ep = done[0]
    assert cut_ep.rows["truncated"][-1] and not cut_ep.rows["truncated"][:-1].any()  # closed at its last row
    for ep in done:  # each chained: every step starts where the one before it ended
        np.testing.assert_array_equal(ep.rows["obs"][1:], ep.rows["next_obs"][:-1])


def test_step_numbers_going_back_start_a_new_episode_for_the_learner():
    """A restarted driver that reuses its episode number (no outbox to remember it) is caught by
    its step numbers: the cut episode ends, truncated, where its last record ended."""

    def tr(start: int, k: int = 5) -> P.Transition:
        o = np.arange(start, start + k + 1, dtype=np.float32)[:, None].repeat(OBS, 1)
        return P.Transition(0, start, {"state": o[:-1]}, np.zeros((k, ACT), np.float32), np.full(k, -1.0, np.float32),
                            np.zeros(k, bool), np.zeros(k, bool), {"state": o[1:]})

    a = EpisodeAssembler(["state"], OBS)
    assert a.add(1, "robot", "", tr(0)) == [] and a.add(2, "robot", "", tr(5)) == []
    (cut,) = a.add(3, "robot", "", tr(0))  # the same robot, the same episode number, step 0 again
    assert cut.length == 10 and cut.rows["truncated"][-1] and a.pending_steps == 5
    state = a.state_dict()  # the guard survives a learner checkpoint
    b = EpisodeAssembler(["state"], OBS)
    b.load_state_dict(state)
    (again,) = b.add(4, "robot", "", tr(0))
    assert again.length == 5


def test_transitions_carry_the_version_that_acted_and_keep_it_when_re_sent_elsewhere(server, tmp_path):
    srv, journal = server
    driver = build_driver(compose("drive", ["driver=mock"]))
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("mock"), outbox=Outbox(tmp_path / "box-a"))
    client.connect(10.0)
    try:
        ex = ChunkExecutor(client, H, "open_loop", 0.5, 5.0, wait_when_empty=True)
        run_episode(driver, ex, 0, 0, client=client, send_transitions=True, max_steps=12)
        box_a = client.outbox
        assert box_a is not None
        wait_until(lambda: (client.heartbeat(), client.poll(0.01), box_a.pending)[2] == 0, 60, "the acks")
    finally:
        client.close()
        driver.close()
    sent = [r.transition for r in _journal(journal)]
    assert sum(len(t.actions) for t in sent) == 12
    assert {t.policy_version for t in sent} == {"5"}  # the driver's own word, not the server's fill-in

    # The robot's outbox re-sends those bytes to a restarted server that now serves v9 and has
    # already served this session a v9 chunk: the records keep v5.
    other, journal_b = _serve(tmp_path, "b", "9")
    box = Outbox(tmp_path / "box-b")
    c = PolicyClient(other.address, driver.spec.hello("mock"), outbox=box)
    try:
        c.connect(10.0)
        rid = c.request({"state": np.zeros(OBS, np.float32)}, 0, 0, reset=True)
        wait_until(lambda: isinstance(c.poll(0.01), P.Chunk), 60, "a v9 chunk")
        assert rid is not None
        for t in sent:
            c.send_transition(t)
        wait_until(lambda: (c.heartbeat(), c.poll(0.01), box.pending)[2] == 0, 60, "the re-sent ones acknowledged")
    finally:
        c.close()
        other.stop()
    again = _journal(journal_b)
    assert len(again) == len(sent) and {r.policy_version for r in again} == {"5"}


@pytest.fixture(scope="module")
def offline(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qc_robot.train.learner import CHECKPOINT, train

    run = tmp_path_factory.mktemp("offline")
    train(compose("train", ["experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                            "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"]))
    return run / CHECKPOINT


def test_episodes_csv_agrees_with_the_checkpoint_after_a_crash(offline, tmp_path):
    """Episodes finished after the last checkpoint are applied again by the resumed learner: their
    rows are logged once, not twice."""
    from qc_robot.finetune.client import Record
    from qc_robot.finetune.config import FinetuneConfig
    from qc_robot.finetune.loop import Finetuner

    obs = 28  # the tiny dataset's task
    cfg = FinetuneConfig(checkpoint=str(offline), run_dir=str(tmp_path / "ft"), replay_capacity=500,
                         intervention_capacity=100, save_every=0, log_interval=0)

    def records(lo: int, hi: int) -> list[Record]:  # episode e: 2 records of 5 steps, the second ends it
        out = []
        for e in range(lo, hi):
            for i in range(2):
                o = np.random.default_rng(10 * e + i).normal(size=(5, obs)).astype(np.float32)
                trunc = np.zeros(5, bool)
                trunc[-1] = i == 1
                tr = P.Transition(e, 5 * i, {"state": o}, np.zeros((5, ACT), np.float32), np.full(5, -1.0, np.float32),
                                  np.zeros(5, bool), trunc, {"state": o + 0.1})
                out.append(Record(2 * e + i + 1, "s", "mock", "1", 0.0, tr))
        return out

    ft = Finetuner(cfg)
    ft.apply(records(0, 3))
    ft.save()
    ft.apply(records(3, 5))  # logged, then the learner is killed before its next checkpoint
    assert ft.episodes == 5
    back = Finetuner(cfg)
    assert back.episodes == 3 and back.applied_seq == 6
    back.apply(records(3, 5))  # the server re-sends what the checkpoint lacks
    with (tmp_path / "ft" / "episodes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["episode"]) for r in rows] == [1, 2, 3, 4, 5]


def test_one_version_is_one_policy_across_restarts_and_a_restarted_server_serves_the_newest(tmp_path):
    """The soak's sequence: the learner pushes v9 and dies before a checkpoint records it, the
    server restarts. The restarted server serves v9 (not its startup policy), tells learners it has
    accepted v9, and refuses any other file under that number, also when told to start from its
    startup policy."""
    from test_finetune_link import ACT as L_ACT
    from test_finetune_link import OBS as L_OBS
    from test_finetune_link import ConstPolicy, const_loader, driver

    from qc_robot.finetune.client import LearnerClient
    from qc_robot.server.serve import _resumed_policy

    def start(resume: bool) -> ControlServer:
        link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / "journal"), heartbeat_s=0.2, timeout_s=2.0,
                           policy_loader=const_loader)
        startup = ConstPolicy(0.1, "0")
        return ControlServer(_resumed_policy(link, startup) if resume else startup, "tcp://127.0.0.1:*",
                             learner_link=link).start()

    def learner(s: ControlServer) -> LearnerClient:
        assert s.link is not None
        c = LearnerClient(s.link.address, 1, heartbeat_s=0.2).start()
        assert c.subscribed.wait(60)
        return c

    def served(s: ControlServer) -> P.Chunk:
        c = driver(s.address)
        try:
            c.request({"state": np.zeros(L_OBS, np.float32)}, 0, 0)
            reply = c.poll(60.0)
            assert isinstance(reply, P.Chunk)
            return reply
        finally:
            c.close()

    s = start(resume=True)
    lrn = learner(s)
    try:
        ack = lrn.push_policy(9, b"0.2", timeout_s=60)
        assert ack is not None and ack.accepted
    finally:
        lrn.close()
        s.stop()

    s = start(resume=True)  # restarted: the newest accepted policy, not the startup one
    lrn = learner(s)
    try:
        chunk = served(s)
        assert chunk.policy_version == "9" and np.allclose(chunk.actions, 0.2) and chunk.actions.shape[1] == L_ACT
        assert lrn.server_version == 9  # a learner resumed from before v9 numbers its next push 10
        ack = lrn.push_policy(9, b"0.3", timeout_s=60)
        assert ack is not None and not ack.accepted
    finally:
        lrn.close()
        s.stop()

    s = start(resume=False)  # told to start from its startup policy: v9 still owns its number
    lrn = learner(s)
    try:
        assert served(s).policy_version == "0" and lrn.server_version == 9
        ack = lrn.push_policy(9, b"0.4", timeout_s=60)
        assert ack is not None and not ack.accepted and "accepted before" in ack.reason
        ack = lrn.push_policy(10, b"0.4", timeout_s=60)
        assert ack is not None and ack.accepted
    finally:
        lrn.close()
        s.stop()
    assert (tmp_path / "journal" / "policies" / "model-v9.onnx").read_text() == "0.2"  # never overwritten


def test_a_refused_push_leaves_no_policy_a_restart_could_serve(tmp_path):
    from test_finetune_link import ConstPolicy, const_loader

    from qc_robot.finetune.client import LearnerClient
    from qc_robot.server.serve import _resumed_policy

    link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / "journal"), heartbeat_s=0.2, timeout_s=2.0,
                       policy_loader=const_loader)
    s = ControlServer(ConstPolicy(0.1, "0"), "tcp://127.0.0.1:*", learner_link=link).start()
    lrn = LearnerClient(link.address, 1, heartbeat_s=0.2).start()
    try:
        assert lrn.subscribed.wait(60)
        ack = lrn.push_policy(3, b"not a number", timeout_s=60)  # the loader fails on it
        assert ack is not None and not ack.accepted
    finally:
        lrn.close()
        s.stop()
    assert link.accepted_policies() == {}
    startup = ConstPolicy(0.1, "0")
    assert _resumed_policy(link, startup) is startup
