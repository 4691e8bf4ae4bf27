"""``qc-robot finetune`` end to end on a tiny checkpoint: a real server (ONNX policy, learner port),
a lockstep mock robot streaming transitions, the learner updating and pushing new versions that
the server then serves; resume from the finetune checkpoint; interventions and reward functions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qc_robot import protocol as P
from qc_robot.cli import compose
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.mock import MockConfig
from qc_robot.drivers.registry import make_safe_driver
from qc_robot.drivers.runner import run_episode
from qc_robot.export.graph import ExportGraph
from qc_robot.export.verify import verify_file
from qc_robot.finetune.client import Record
from qc_robot.finetune.config import FinetuneConfig
from qc_robot.finetune.loop import Finetuner, export_onnx_bytes
from qc_robot.policies.onnx_policy import OnnxPolicy
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink
from qc_robot.train.checkpoint import load_checkpoint
from qc_robot.train.learner import CHECKPOINT, train

OBS, ACT, H = 28, 5, 5  # cube-single-task1


@pytest.fixture(scope="module")
def offline(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-update offline checkpoint of the smoke agent and its exported model.onnx."""
    run = tmp_path_factory.mktemp("offline")
    cfg = compose("train", ["experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                            "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"])
    train(cfg)
    ckpt = load_checkpoint(run / CHECKPOINT)
    model = run / "model.onnx"
    model.write_bytes(export_onnx_bytes(ckpt.agent, ckpt, ckpt.step))
    return run / CHECKPOINT, model


def ft_cfg(ckpt: Path, run_dir: Path, server: str = "tcp://127.0.0.1:1", **kw: object) -> FinetuneConfig:
    base: dict[str, object] = dict(checkpoint=str(ckpt), server=server, run_dir=str(run_dir), replay_capacity=20_000,
                                   intervention_capacity=500, push_every=20, save_every=0, log_interval=10,
                                   heartbeat_s=0.2, timeout_s=3.0, max_wall_s=300.0)  # a cap, not a timing check
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def robot(address: str, stop: threading.Event, versions: list[str],
          lengths: tuple[threading.Condition, list[int]] | None = None) -> None:
    """A lockstep mock arm running episodes of 20 steps against the server until ``stop``;
    ``lengths``: each episode's transitions sent, appended in order (fewer than 20 where the
    watchdog ended one: a busy machine can starve the server for a second)."""
    driver = make_safe_driver("mock", MockConfig(action_dim=ACT, obs_dim=OBS, max_episode_steps=20))
    driver.connect()
    client = PolicyClient(address, driver.spec.hello("mock"))
    client.connect(5.0)
    ex = ChunkExecutor(client, H, "open_loop", wait_when_empty=True)
    original = client._handle

    def seen(msg: P.Message) -> P.Chunk | P.Error | None:  # record the version of every chunk served
        if isinstance(msg, P.Chunk):
            versions.append(msg.policy_version)
        return original(msg)

    client._handle = seen  # type: ignore[method-assign]
    i = 0
    while not stop.is_set():
        res = run_episode(driver, ex, i, i, None, client, send_transitions=True)
        if lengths is not None:
            with lengths[0]:
                lengths[1].append(res.rows)
                lengths[0].notify_all()
        i += 1
        time.sleep(0.05)  # leave the learner some CPU on a 2-core machine
    client.close()
    driver.close()


def test_finetune_appends_updates_pushes_and_the_server_serves_it(offline, tmp_path):
    ckpt, model = offline
    link = LearnerLink("tcp://127.0.0.1:*", Journal(tmp_path / "journal"), heartbeat_s=0.2)
    server = ControlServer(OnnxPolicy(model, threads=1), "tcp://127.0.0.1:*", learner_link=link).start()
    stop, versions = threading.Event(), []
    sent: tuple[threading.Condition, list[int]] = (threading.Condition(), [])
    arm = threading.Thread(target=robot, args=(server.address, stop, versions, sent), daemon=True)
    arm.start()
    try:
        ft = Finetuner(ft_cfg(ckpt, tmp_path / "ft", link.address, max_updates=40))
        offline_rows = ft.replay.size
        r = ft.run()
        assert r.updates == 40 and r.env_steps >= 40
        assert r.policy_version == 2 == server.policy_version  # pushed after 20 and 40 updates
        assert [v for v, ok, _ in link.pushes if ok] == [1, 2]
        # the first swap after the trace is checked against torch, the next (verify_every=10) is not,
        # and is still exactly the learner's final policy
        assert ft.pusher is not None
        assert [(s.kind, s.verified) for s in ft.pusher.stats] == [("swap", True), ("swap", False)]
        served = link.policy_dir / "model-v2.onnx"
        acting = load_checkpoint(tmp_path / "ft" / CHECKPOINT).agent.acting_policy().cpu().eval()
        meta = OnnxPolicy(served, threads=1, warmup=0).meta
        ref = ExportGraph(acting, meta.action_low, meta.action_high, lean=False, max_guidance=meta.rtc_max_guidance)
        assert verify_file(served, ref.eval(), acting, meta, 1e-4) <= 1e-4
        with sent[0]:  # the robot notes an episode's length just after its last transition left
            assert sent[0].wait_for(lambda: len(sent[1]) >= r.episodes, timeout=60)
            whole = sum(sent[1][: r.episodes])
        assert ft.replay.size == offline_rows + whole > offline_rows  # the first r.episodes, whole
        n = len(versions)
        deadline = time.monotonic() + 10
        while len(versions) < n + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert versions[-1] == "2"  # the robot now runs the pushed policy
        assert versions[0] != "2"
        state = load_checkpoint(tmp_path / "ft" / CHECKPOINT).extra["finetune"]
        assert state["applied_seq"] == r.applied_seq > 0 and state["journal_id"] == link.journal.id

        again = Finetuner(ft_cfg(ckpt, tmp_path / "ft", link.address, max_updates=45, push_every=0,
                                 push_on_exit=False))
        assert again.updates == 40 and again.applied_seq == r.applied_seq  # resumed from the checkpoint
        r2 = again.run()
        assert r2.updates == 45 and r2.applied_seq > r.applied_seq and r2.policy_version == 2
    finally:
        stop.set()
        arm.join(10)
        server.stop()


def _record(seq: int, start: int, k: int, interv: list[bool], success: bool = False, last: bool = False,
            session: str = "a", episode: int = 0) -> Record:
    rng = np.random.default_rng(seq)
    o = rng.normal(size=(k, OBS)).astype(np.float32)
    term = np.zeros(k, bool)
    term[-1] = last and success
    trunc = np.zeros(k, bool)
    trunc[-1] = last and not success
    tr = P.Transition(episode, start, {"state": o}, rng.uniform(-1, 1, (k, ACT)).astype(np.float32),
                      np.full(k, -1.0, np.float32), term, trunc, {"state": o + 0.1}, success,
                      intervention=np.asarray(interv, bool))
    return Record(seq, session, "mock", "0", 0.0, tr)


def test_interventions_fill_their_buffer_and_half_of_each_batch(offline, tmp_path):
    ckpt, _ = offline
    ft = Finetuner(ft_cfg(ckpt, tmp_path / "ft", reward_fn="qc_robot.finetune.episodes:success_reward"))
    rows0 = ft.replay.size
    # two robots interleave; robot b's operator takes over for steps 5..9 of its episode
    recs = [_record(1, 0, 5, [False] * 5, session="a"), _record(2, 0, 5, [False] * 5, session="b"),
            _record(3, 5, 5, [True] * 5, session="b"), _record(4, 5, 5, [False] * 5, session="a"),
            _record(5, 10, 5, [False] * 5, success=True, last=True, session="b"),
            _record(5, 99, 5, [True] * 5, session="b")]  # a duplicate seq: ignored
    ft.apply(recs)
    assert ft.applied_seq == 5 and ft.env_steps == 25
    assert ft.replay.size == rows0 + 15  # b's whole episode; a's is still open
    rows = ft.replay.numpy()
    np.testing.assert_array_equal(rows["rewards"][rows0:], [-1.0] * 14 + [0.0])  # success_reward
    assert rows["terminals"][-1] == 1.0 and rows["masks"][-1] == 0.0 and rows["terminals"][rows0:-1].sum() == 0
    assert ft.interventions.size == 5 + H - 1  # the takeover and the rows a chunk from it needs
    batch = ft.sample()
    b = ft.batch_size
    assert batch.batch_size == b
    ib = ft.interventions.numpy()["observations"]
    from_int = sum(any(np.allclose(o, x) for x in ib) for o in batch.observations.numpy())
    assert from_int >= b // 2  # half the batch from the intervention buffer (and maybe a few more)
    ft.agent.update(batch)
    ft.save()
    back = Finetuner(ft_cfg(ckpt, tmp_path / "ft"))
    assert back.interventions.size == ft.interventions.size and back.applied_seq == 5
    assert back.assembler.pending_steps == 10  # robot a's open episode survived the restart
