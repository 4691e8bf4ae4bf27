"""``qc-robot finetune`` and reward conventions over real sockets: a robot whose transitions declare
another convention than the checkpoint's is refused at its first such record, in one line, before
training on it; the record stays in the server's journal, and a documented way round (reward_fn)
picks it up on resume."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from qc_robot import protocol as P
from qc_robot.cli import compose
from qc_robot.drivers.base import DriverSpec
from qc_robot.drivers.client import PolicyClient
from qc_robot.finetune.config import FinetuneConfig
from qc_robot.finetune.loop import Finetuner, run_finetune
from qc_robot.policies.base import ObsField
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink
from qc_robot.server.serve import load_policy
from qc_robot.train.checkpoint import load_checkpoint
from qc_robot.train.learner import CHECKPOINT, train

OBS, ACT, H, K = 28, 5, 5, 5  # cube-single-task1


@pytest.fixture(scope="module")
def dense_ckpt(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-update offline checkpoint on cube-single-task1's play data (dense rewards)."""
    run = tmp_path_factory.mktemp("offline")
    train(compose("train", ["experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                            "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"]))
    return run / CHECKPOINT


def transition(episode: int, start: int, reward: str, last: bool) -> P.Transition:
    rng = np.random.default_rng(start + 100 * episode)
    o = rng.normal(size=(K, OBS)).astype(np.float32)
    trunc = np.zeros(K, bool)
    trunc[-1] = last
    return P.Transition(episode, start, {"state": o}, rng.uniform(-1, 1, (K, ACT)).astype(np.float32),
                        np.full(K, -1.0, np.float32), np.zeros(K, bool), trunc, {"state": o + 0.1}, reward=reward)


def send_all(address: str, transitions: list[P.Transition], journal: Journal) -> None:
    """Send from a real driver client; returns once the server has journaled every one."""
    spec = DriverSpec([ObsField("state", (OBS,), "float32")], ACT, -np.ones(ACT), np.ones(ACT), 20.0)
    c = PolicyClient(address, spec.hello("arm"))
    c.connect(5.0)
    try:
        for tr in transitions:
            deadline = time.monotonic() + 5.0
            while not c.send_transition(tr):
                assert time.monotonic() < deadline, "driver could not send"
                c.poll(0.02)
        deadline = time.monotonic() + 10.0
        while journal.next_seq <= len(transitions):  # hang guard, not a timing check
            assert time.monotonic() < deadline, "the server never journaled the transitions"
            time.sleep(0.02)
    finally:
        c.close()


def ft_cfg(ckpt: Path, run_dir: Path, server: str, **kw: object) -> FinetuneConfig:
    base: dict[str, object] = dict(checkpoint=str(ckpt), server=server, run_dir=str(run_dir), replay_capacity=5_000,
                                   intervention_capacity=100, push_every=0, push_on_exit=False, save_every=0,
                                   log_interval=0, heartbeat_s=0.2, timeout_s=3.0, max_wall_s=120.0)  # a hang cap
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_finetune_refuses_rows_of_another_reward_convention(dense_ckpt, tmp_path, capsys):
    assert load_checkpoint(dense_ckpt).reward == "dense"
    journal = Journal(tmp_path / "journal")
    link = LearnerLink("tcp://127.0.0.1:*", journal, heartbeat_s=0.2)
    server = ControlServer(load_policy(f"hold:{OBS}:{ACT}:{H}"), "tcp://127.0.0.1:*", learner_link=link).start()
    try:
        # an unspecified and a matching convention pass; the sparse robot's first record is refused
        send_all(server.address, [transition(0, 0, "", False), transition(0, 5, "dense", True),
                                  transition(1, 0, "sparse", False), transition(1, 5, "sparse", True)], journal)
        run_dir = tmp_path / "ft"
        rc = run_finetune(ft_cfg(dense_ckpt, run_dir, link.address))
        out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
        assert rc == 2
        assert out[-1].startswith("qc-robot finetune: record 3 from arm (") and "sparse rewards" in out[-1]
        assert f"{dense_ckpt} was trained on dense rewards" in out[-1]
        saved = load_checkpoint(run_dir / CHECKPOINT)
        assert saved.reward == "dense"
        assert saved.extra["finetune"]["applied_seq"] == 2 and saved.env_steps == 2 * K  # nothing of record 3
        assert saved.extra["finetune"]["episodes"] == 1

        # nothing lost: with a reward_fn (which defines the rewards itself) the resumed learner takes
        # record 3 and 4 from the server's journal
        ft = Finetuner(ft_cfg(dense_ckpt, run_dir, link.address, reward_fn="qc_robot.finetune.episodes:success_reward",
                              max_env_steps=4 * K))
        assert ft.applied_seq == 2
        r = ft.run()
        assert r.applied_seq == 4 and r.env_steps == 4 * K and r.episodes == 2
    finally:
        server.stop()


def test_transition_reward_field_on_the_wire_and_in_the_server_check():
    from qc_robot.policies.scripted import simple_spec
    from qc_robot.server.checks import check_transition

    tr = transition(0, 0, "sparse", True)
    back = P.decode(P.encode(tr))
    assert isinstance(back, P.Transition) and back.reward == "sparse"
    assert P.Transition(0, 0, {}, np.zeros((1, 1)), np.zeros(1), np.zeros(1, bool), np.zeros(1, bool), {}).reward == ""
    spec = simple_spec(OBS, ACT, H)
    assert check_transition(spec, tr).reward == "sparse"
    with pytest.raises(ValueError, match="transition.reward"):
        check_transition(spec, transition(0, 0, "sparse; rm -rf\n", True))


def test_finetune_refuses_a_dataset_of_another_convention_at_start(dense_ckpt, tmp_path):
    """A robot's recording (verdicts: sparse) as the offline data of a dense checkpoint."""
    from qc_robot.data.hdf5_io import EpisodeWriter

    arm = tmp_path / "arm.hdf5"
    o = np.random.default_rng(0).normal(size=(7, OBS)).astype(np.float32)
    with EpisodeWriter(arm, {"driver": "so101", "source": "qc-robot teleop", "control_hz": 20.0}) as w:
        w.add_episode({"state": o[:-1]}, np.zeros((6, ACT)), np.zeros(6), np.zeros(6), {"state": o[1:]},
                      attrs={"label": "success"})
    with pytest.raises(ValueError, match=f"{arm} holds sparse rewards but .* was trained on dense rewards"):
        Finetuner(ft_cfg(dense_ckpt, tmp_path / "ft", "tcp://127.0.0.1:1", data_path=str(arm)))
