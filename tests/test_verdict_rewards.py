"""Rewards from verdicts (issue 22): a robot's recording is read in the sparse convention from each
episode's verdict, never as all-success; a demo without a verdict is refused for RL in one line;
checkpoints store their reward convention. Real HDF5 files written by the project's Recorder and
teleop session, the real learner."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from qc_robot.cli import compose, main
from qc_robot.config import EnvConfig
from qc_robot.data.hdf5_io import DatasetError, EpisodeWriter, load_flat, validate
from qc_robot.data.recorder import Recorder, journal_path
from qc_robot.data.rewards import DENSE, FROM_RECORDED, FROM_VERDICT, SPARSE, reward_source
from qc_robot.drivers.mock import MockConfig
from qc_robot.drivers.registry import make_safe_driver
from qc_robot.teleop.config import TeleopConfig
from qc_robot.teleop.devices import Event, TeleopCommand, TeleopDevice
from qc_robot.teleop.session import TeleopSession, env_args_for
from qc_robot.train.checkpoint import load_checkpoint
from qc_robot.train.learner import CHECKPOINT, Learner, train

ACT = 5
OBS = 28  # the smoke agent's task (cube-single-task1): the recording could also drive its eval


class Operator(TeleopDevice):
    """Starts each episode, pushes the arm for ``lengths[i]`` steps, then gives ``verdicts[i]``."""

    def __init__(self, lengths: list[int], verdicts: list[Event]) -> None:
        self.lengths, self.verdicts, self.i, self.t, self.active = lengths, verdicts, 0, 0, False

    def episode_started(self, obs: dict[str, np.ndarray]) -> None:
        self.active, self.t = True, 0

    def episode_ended(self) -> None:
        self.active = False
        self.i += 1

    def read(self) -> TeleopCommand:
        if not self.active:
            return TeleopCommand(None, [Event.START] if self.i < len(self.lengths) else [Event.QUIT])
        if self.t >= self.lengths[self.i]:
            return TeleopCommand(None, [self.verdicts[self.i]])
        self.t += 1
        return TeleopCommand(np.full(ACT, 0.3, np.float32), [])


def mock_recording(out: Path, lengths: list[int], verdicts: list[Event]) -> list[str]:
    """Episodes recorded as `qc-robot teleop driver=mock` records them (the mock reports reward
    -distance and never succeeds here: a robot's reward is no success signal)."""
    driver = make_safe_driver("mock", MockConfig(action_dim=ACT, obs_dim=OBS, success_radius=0.0))
    cfg = TeleopConfig(driver="mock", out=str(out), status=False)
    driver.connect()
    try:
        with Recorder(str(out), env_args_for(cfg, driver)) as rec:
            res = TeleopSession(driver, Operator(lengths, verdicts), rec, time_scale=50.0).run()
    finally:
        driver.close()
    return res.labels


def expected(lengths: list[int], labels: list[str]) -> tuple[list[float], list[float], list[float]]:
    """(rewards, terminals, masks) of the sparse convention, by hand."""
    r: list[float] = []
    term: list[float] = []
    mask: list[float] = []
    for n, lab in zip(lengths, labels, strict=True):
        r += [-1.0] * (n - 1) + [0.0 if lab == "success" else -1.0]
        term += [0.0] * (n - 1) + [1.0]  # the episode ends at its last row either way
        mask += [1.0] * (n - 1) + [0.0 if lab == "success" else 1.0]  # only a success stops bootstrapping
    return r, term, mask


def test_a_robot_recording_loads_its_verdicts_in_the_sparse_convention(tmp_path):
    out = tmp_path / "arm.hdf5"
    lengths = [6, 4, 5]
    labels = mock_recording(out, lengths, [Event.SUCCESS, Event.FAILURE, Event.SUCCESS])
    assert labels == ["success", "failure", "success"]
    with h5py.File(out) as f:
        assert json.loads(f["data"].attrs["env_args"])["reward_source"] == FROM_VERDICT
        stored = np.concatenate([f[f"data/demo_{i}/rewards"][()] for i in range(3)])
    r, term, mask = expected(lengths, labels)
    np.testing.assert_array_equal(stored, r)  # new recordings hold the verdict rewards themselves
    for sparse in (True, False):  # the task's own setting does not apply: verdicts are sparse
        ds = load_flat(out, sparse_reward=sparse)
        assert ds.reward_source == FROM_VERDICT
        np.testing.assert_array_equal(ds.rewards, r)
        np.testing.assert_array_equal(ds.terminals, term)
        np.testing.assert_array_equal(ds.masks, mask)
    assert validate(out) == []


def _legacy_file(path: Path, driver: str = "so101") -> None:
    """A robot recording as teleop wrote it before verdict rewards: rewards 0, dones 0, the
    verdict only in attrs['label'], env_args without a reward source."""
    env_args = {"driver": driver, "control_hz": 20.0, "obs_keys": ["state"], "obs_shapes": {"state": [OBS]},
                "act_dim": ACT, "source": "qc-robot teleop"}
    rng = np.random.default_rng(0)
    with EpisodeWriter(path, env_args) as w:
        for n, label in ((5, "success"), (3, "failure")):
            o = rng.normal(size=(n + 1, OBS)).astype(np.float32)
            w.add_episode({"state": o[:-1]}, rng.uniform(-1, 1, (n, ACT)), np.zeros(n), np.zeros(n),
                          {"state": o[1:]}, attrs={"label": label, "success": label == "success"})


def test_the_old_all_success_reading_is_gone(tmp_path):
    """Before: sparsify(0) = 0 made every step of a robot's file a success (rewards 0, and with
    ``dones`` 0 no episode ever terminated). Now the verdicts decide."""
    old = tmp_path / "old.hdf5"
    _legacy_file(old)
    ds = load_flat(old, sparse_reward=True)
    r, term, mask = expected([5, 3], ["success", "failure"])
    assert (ds.rewards == 0).sum() == 1  # one success step, not eight
    np.testing.assert_array_equal(ds.rewards, r)
    np.testing.assert_array_equal(ds.masks, mask)
    np.testing.assert_array_equal(ds.terminals, term)
    # recording more into the old file: its env_args did not state the source, the same data
    obs = {"state": np.zeros(OBS, np.float32)}
    with Recorder(str(old), {**json.loads(h5py.File(old)["data"].attrs["env_args"]), "reward_source": "verdict"}) as rec:
        rec.begin(obs, {})
        for _ in range(2):
            rec.step(np.zeros(ACT), 0.0, False, obs)
        rec.finish("success")
    ds = load_flat(old)
    np.testing.assert_array_equal(ds.rewards[-2:], [-1.0, 0.0])
    assert ds.masks[-1] == 0.0


def test_sim_recordings_keep_the_simulators_rewards(tmp_path):
    """driver=sim: the recorded rewards are the task's (the shipping policy trains on them)."""
    pytest.importorskip("ogbench")
    from qc_robot.teleop.session import run_teleop

    out = tmp_path / "sim.hdf5"
    cfg = TeleopConfig(driver="sim", env=EnvConfig(name="cube-single-task1"), device="scripted", out=str(out),
                       realtime=False, time_scale=1000.0, end_after=8, status=False, outcomes=["success"])
    assert run_teleop(cfg) == 0
    with h5py.File(out) as f:
        stored, dones = f["data/demo_0/rewards"][()], f["data/demo_0/dones"][()]
        assert f["data/demo_0"].attrs["label"] == "success"
    assert (stored < 0).all()  # the cube is not at its goal after 8 steps: the task says so
    ds = load_flat(out)
    assert ds.reward_source == FROM_RECORDED
    np.testing.assert_array_equal(ds.rewards, stored)  # the operator's 'success' does not rewrite them
    np.testing.assert_array_equal(ds.masks, 1.0 - dones)


def test_a_demo_without_a_verdict_is_refused_for_rl_in_one_line(tmp_path, capsys):
    out = tmp_path / "arm.hdf5"
    mock_recording(out, [6], [Event.SUCCESS])
    obs = {"state": np.zeros(OBS, np.float32)}
    env_args = json.loads(h5py.File(out)["data"].attrs["env_args"])
    rec = Recorder(str(out), env_args)  # a crash mid-episode: the journal stays, unlabelled
    rec.begin(obs, {})
    for _ in range(3):
        rec.step(np.zeros(ACT), 0.0, False, obs)
    rec.close()
    assert Path(journal_path(str(out))).exists()
    with Recorder(str(out), env_args) as again:
        assert again.recovered == "demo_1"
    with pytest.raises(DatasetError) as e:
        load_flat(out, sparse_reward=True)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "data/demo_1" in msg and "'unlabelled'" in msg
    assert "qc-robot dataset label" in msg
    assert validate(out) == [msg]
    # readers that ignore rewards may still read it; its rewards are unknown, not a success
    ds = load_flat(out, need_rewards=False)
    assert len(ds) == 9 and np.isnan(ds.rewards[6:]).all() and ds.masks[6:].min() == 1.0

    # the learner refuses it before any update, in one line
    run = tmp_path / "run"
    code = main(["train", "experiment=smoke", f"data.path={out}", f"training.run_dir={run}",
                 "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert code == 2 and lines[-1] == f"qc-robot train: {msg}"
    assert not (run / CHECKPOINT).exists()

    # what the message says to do
    assert main(["dataset", "label", str(out), "demo_1", "failure"]) == 0
    ds = load_flat(out)
    np.testing.assert_array_equal(ds.rewards[6:], [-1.0] * 3)
    assert ds.masks[6:].min() == 1.0 and validate(out) == []


def test_checkpoints_store_their_reward_convention(tiny_dataset, tmp_path):
    arm = tmp_path / "arm.hdf5"
    mock_recording(arm, [6, 4], [Event.SUCCESS, Event.FAILURE])

    def cfg(data: Path, run: str, *extra: str):  # noqa: ANN202
        return compose("train", ["experiment=smoke", f"data.path={data}", f"training.run_dir={tmp_path / run}",
                                 "training.offline_steps=2", "training.online_steps=0",
                                 "training.eval_episodes=0", *extra])

    # cube-single-task1's own default is dense: sim data trains dense, the robot's verdicts sparse
    train(cfg(tiny_dataset, "sim"))
    train(cfg(arm, "arm"))
    assert load_checkpoint(tmp_path / "sim" / CHECKPOINT).reward == DENSE
    assert load_checkpoint(tmp_path / "arm" / CHECKPOINT).reward == SPARSE
    # the online phase and evaluation in sim then run the task with sparse rewards too
    assert Learner(cfg(arm, "arm2", "env.sparse_reward=false")).reward_convention == SPARSE

    # a checkpoint saved before conventions were stored: its config tells
    payload = torch.load(tmp_path / "sim" / CHECKPOINT, weights_only=False)
    del payload["reward"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").reward == DENSE
    payload["config"]["env"]["sparse_reward"] = True
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").reward == SPARSE


def test_reward_source_of_files_written_before_it_was_stated():
    teleop = {"driver": "so101", "source": "qc-robot teleop", "control_hz": 20.0}
    assert reward_source(teleop) == FROM_VERDICT
    assert reward_source({**teleop, "driver": "sim", "task": "cube-single"}) == FROM_RECORDED
    assert reward_source({"task": "cube-single-task1", "source": "qc-robot datagen"}) == FROM_RECORDED
    assert reward_source({"env_name": "Lift"}) == FROM_RECORDED  # robomimic
    assert reward_source({"source": "qc-robot serve"}) == FROM_RECORDED
    with pytest.raises(ValueError, match="reward_source"):
        reward_source({"reward_source": "guess"})
