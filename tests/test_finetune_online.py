"""Online data reaches training as it arrives, with exact episode bookkeeping: open episodes are
sampled before they end and never mixed between robots; resume keeps open episodes and never glues
two episodes; an outbox re-delivery is applied once; per-robot stats; a dead helper thread ends
``qc-robot finetune`` with a non-zero exit; a paced lockstep robot waits for training."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qc_robot import protocol as P
from qc_robot.cli import compose
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.mock import MockConfig
from qc_robot.drivers.registry import make_safe_driver
from qc_robot.drivers.runner import PolicyPace, run_episode
from qc_robot.finetune.client import Record
from qc_robot.finetune.config import FinetuneConfig
from qc_robot.finetune.loop import Finetuner, export_onnx_bytes, run_finetune
from qc_robot.policies.onnx_policy import OnnxPolicy
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink
from qc_robot.train.checkpoint import load_checkpoint
from qc_robot.train.learner import CHECKPOINT, Learner, train

OBS, ACT, H = 28, 5, 5
SENTINEL = {"a": 0.75, "b": -0.75}


@pytest.fixture(scope="module")
def offline(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run = tmp_path_factory.mktemp("offline")
    cfg = compose("train", ["experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                            "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"])
    train(cfg)
    ckpt = load_checkpoint(run / CHECKPOINT)
    model = run / "model.onnx"
    model.write_bytes(export_onnx_bytes(ckpt.agent, ckpt, ckpt.step))
    return run / CHECKPOINT, model


def cfg(ckpt: Path, run_dir: Path, server: str = "tcp://127.0.0.1:1", **kw: object) -> FinetuneConfig:
    base: dict[str, object] = dict(checkpoint=str(ckpt), server=server, run_dir=str(run_dir), replay_capacity=5_000,
                                   intervention_capacity=100, save_every=0, log_interval=0, heartbeat_s=0.2,
                                   timeout_s=3.0, max_wall_s=60.0)
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def record(seq: int, session: str, start: int, k: int, last: bool = False, outbox: str = "",
           outbox_seq: int = 0) -> Record:
    """K steps of ``session``: action[0] marks the robot, action[1] the step (to check chunks)."""
    steps = np.arange(start, start + k)
    acts = np.zeros((k, ACT), np.float32)
    acts[:, 0], acts[:, 1] = SENTINEL[session], steps / 1000.0
    o = np.random.default_rng(seq).normal(size=(k, OBS)).astype(np.float32)
    trunc = np.zeros(k, bool)
    trunc[-1] = last
    tr = P.Transition(0, start, {"state": o}, acts, np.full(k, -1.0, np.float32), np.zeros(k, bool), trunc,
                      {"state": o + 0.1}, outbox=outbox, outbox_seq=outbox_seq)
    return Record(seq, session, "mock", "0", 0.0, tr)


def test_open_episodes_are_sampled_before_they_end_and_never_mixed(offline, tmp_path):
    ckpt, _ = offline
    ft = Finetuner(cfg(ckpt, tmp_path / "ft"))
    main0 = ft.replay.size
    recs, seq = [], 0
    for start in range(0, 20, 5):  # two robots interleave, chunk by chunk; neither episode ends
        for s in ("a", "b"):
            seq += 1
            recs.append(record(seq, s, start, 5))
    ft.apply(recs)
    assert ft.replay.size == main0 and ft.online.open_rows == 40 and ft.env_steps == 40
    assert ft.owed() == 40
    seen = 0
    for _ in range(30):
        b = ft.sample()
        acts = b.actions.numpy()  # (B, h, A)
        for chunk, valid in zip(acts, b.valid.numpy(), strict=True):
            robot = [k for k, v in SENTINEL.items() if np.isclose(chunk[0, 0], v)]
            if not robot:
                continue
            seen += 1
            assert valid.all()  # an open episode's chunk never runs past its newest row
            np.testing.assert_allclose(chunk[:, 0], SENTINEL[robot[0]])  # one robot per chunk
            np.testing.assert_allclose(np.diff(chunk[:, 1]), 0.001, atol=1e-6)  # consecutive steps
    # 2 x 16 startable open rows among ~main0 offline ones: about 32/(main0+32) of 30 batches
    expect = 30 * ft.batch_size * 32 / (main0 - H + 1 + 32)
    assert 0.5 * expect < seen < 1.6 * expect, (seen, expect)
    ft.apply([record(9, "a", 20, 5, last=True)])  # a's episode ends: whole into the main replay
    assert ft.replay.size == main0 + 25 and ft.online.open_rows == 20
    rows = ft.replay.numpy()
    np.testing.assert_allclose(rows["actions"][main0:, 1], np.arange(25) / 1000.0, atol=1e-6)
    assert rows["terminals"][main0:].tolist() == [0.0] * 24 + [1.0]
    ft.save()
    back = Finetuner(cfg(ckpt, tmp_path / "ft"))  # b's open episode is staged again on resume
    assert back.online.open_rows == 20 and back.replay.size == main0 + 25
    assert {r["robot"]: r["env_steps"] for r in back.robot_table()} == {"a": 25, "b": 20}
    assert {r["robot"]: r["episodes"] for r in back.robot_table()} == {"a": 1, "b": 0}


def test_an_outbox_redelivery_is_applied_once(offline, tmp_path):
    ckpt, _ = offline
    ft = Finetuner(cfg(ckpt, tmp_path / "ft"))
    recs = [record(1, "a", 0, 5, outbox="box1", outbox_seq=1), record(2, "a", 5, 5, outbox="box1", outbox_seq=2),
            record(3, "a", 5, 5, outbox="box1", outbox_seq=2),  # the server restarted before acking it
            record(4, "a", 10, 5, last=True, outbox="box1", outbox_seq=3)]
    recs[2] = Record(3, "other-session", "mock", "0", 0.0, recs[2].transition)  # after a reconnect
    recs[3] = Record(4, "other-session", "mock", "0", 0.0, recs[3].transition)
    ft.apply(recs)
    assert ft.env_steps == 15 and ft.applied_seq == 4
    (robot,) = ft.robot_table()
    assert robot["robot"] == "box1" and robot["duplicates"] == 1 and robot["episodes"] == 1
    rows = ft.replay.numpy()  # one episode of 15 steps across two server sessions
    np.testing.assert_allclose(rows["actions"][-15:, 1], np.arange(15) / 1000.0, atol=1e-6)


def test_in_process_resume_never_joins_two_episodes(tiny_dataset, tmp_path):
    def run(online: int) -> Learner:
        c = compose("train", ["experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={tmp_path}",
                              "training.offline_steps=2", f"training.online_steps={online}",
                              "training.eval_episodes=0", "training.resume=true"])
        lr = Learner(c)
        lr.run_offline()
        lr.run_online()
        lr.save()
        return lr

    first = run(13)  # cube-single episodes are far longer: interrupted mid-episode
    keep = first.replay.keep
    assert first.replay.numpy()["terminals"][keep:].sum() == 0
    second = run(20)
    t = second.replay.numpy()["terminals"][keep:]
    assert t[12] == 1.0 and t.sum() == 1.0  # the interrupted episode ends where it was cut
    assert second.replay.numpy()["masks"][keep + 12] == 1.0  # a truncation: it still bootstraps


def test_a_dead_link_thread_ends_finetune_with_a_nonzero_exit(offline, tmp_path, capsys):
    ckpt, model = offline
    link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / "journal"), heartbeat_s=0.2)
    server = ControlServer(OnnxPolicy(model, threads=1), "tcp://127.0.0.1:*", learner_link=link).start()
    try:
        import qc_robot.finetune.client as link_client

        original = link_client.LearnerClient._handle

        def broken(self, msg):  # a bug in the link thread, injected once subscribed
            if isinstance(msg, P.Heartbeat):
                raise RuntimeError("injected failure in the link thread")
            return original(self, msg)

        link_client.LearnerClient._handle = broken  # type: ignore[method-assign]
        try:
            rc = run_finetune(cfg(ckpt, tmp_path / "ft", link.address, push_every=0, push_on_exit=False,
                                  max_wall_s=30.0))
        finally:
            link_client.LearnerClient._handle = original  # type: ignore[method-assign]
        assert rc == 1
        assert "learner link thread died" in capsys.readouterr().out
        assert (tmp_path / "ft" / CHECKPOINT).exists()  # saved on the way out
    finally:
        server.stop()


def test_a_paced_lockstep_robot_acts_each_block_with_the_policy_trained_on_everything_before(offline, tmp_path):
    ckpt, model = offline
    link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / "journal"), heartbeat_s=0.2)
    server = ControlServer(OnnxPolicy(model, threads=1), "tcp://127.0.0.1:*", learner_link=link).start()
    ft = Finetuner(cfg(ckpt, tmp_path / "ft", link.address, push_every=H, utd=1, max_env_steps=40,
                       push_on_exit=False))
    versions: list[str] = []
    pace = PolicyPace(H, timeout_s=20.0)

    def gate(chunk: P.Chunk) -> bool:
        ok = pace.accept(chunk)
        if ok:
            versions.append(chunk.policy_version)
        return ok

    def robot() -> None:
        driver = make_safe_driver("mock", MockConfig(action_dim=ACT, obs_dim=OBS, max_episode_steps=20,
                                                     success_radius=0.0))
        client = PolicyClient(server.address, driver.spec.hello("mock"))
        client.connect(5.0)
        ex = ChunkExecutor(client, H, "open_loop", wait_when_empty=True, gate=gate, request_timeout_s=5.0)
        for i in range(2):
            run_episode(driver, ex, i, i, None, client, send_transitions=True, pace=pace)
        client.close()

    arm = threading.Thread(target=robot, daemon=True)
    try:
        ft.prepare()  # the one trace, before other threads run (qc_robot/finetune/push.py)
        arm.start()
        r = ft.run()
        arm.join(30)
        assert not arm.is_alive()
    finally:
        server.stop()
    assert r.env_steps == 40 and r.updates == 40
    # 8 blocks of 5 steps; block k was acted by the policy pushed after 5k updates, i.e. trained on
    # every step before it (only the last block's push is never served: the robot stopped)
    assert versions[1:] == [str(v) for v in range(1, 8)] and versions[0] not in versions[1:]
    assert pace.timeouts == 0 and pace.blocks == 8
    assert torch.isfinite(torch.tensor(pace.wait_s))
