"""What the learner takes from its config and data before the first update (issue 11, items 2–6):
raw observations by default, BFN's N, the online warm-up, data/task width checks, observation
keys and filter keys passed to the loader, and success counting in ``dataset info``."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from qc_robot.cli import compose
from qc_robot.config import TrainConfig, TrainingConfig
from qc_robot.data import tools
from qc_robot.data.hdf5_io import EpisodeWriter, load_flat
from qc_robot.train.learner import Learner, TrainSetupError, run_train


def _cfg(dataset: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    cfg = compose("train", ["experiment=smoke", f"data.path={dataset}", f"training.run_dir={run_dir}",
                            "training.eval_episodes=0", *overrides])
    assert isinstance(cfg, TrainConfig)
    return cfg


def test_observations_are_raw_by_default_and_std_normalised_on_request(tiny_dataset, tmp_path):
    raw = Learner(_cfg(tiny_dataset, tmp_path / "a", "training.online_steps=0"))
    for net in (raw.agent.critic, raw.agent.target_critic, raw.agent.flow):
        assert torch.equal(net.normalizer.mean, torch.zeros_like(net.normalizer.mean))
        assert torch.equal(net.normalizer.std, torch.ones_like(net.normalizer.std))
    std = Learner(_cfg(tiny_dataset, tmp_path / "b", "training.online_steps=0", "agent.obs_norm=std",
                       "agent.obs_norm_eps=0.01"))
    obs = load_flat(tiny_dataset).observations
    want = np.maximum(obs.std(0), 0.01)
    np.testing.assert_allclose(std.agent.flow.normalizer.std.numpy(), want, rtol=1e-5)
    assert (std.agent.flow.normalizer.std.numpy() == 0.01).any()  # the floor did bite here
    with pytest.raises(ValueError, match="obs_norm"):
        Learner(_cfg(tiny_dataset, tmp_path / "c", "training.online_steps=0", "agent.obs_norm=zscore"))


def test_agent_defaults_follow_the_reference():
    assert compose("train", ["agent=bfn_n"]).agent.num_samples == 4
    assert compose("train", ["agent=qc"]).agent.num_samples == 32
    assert TrainingConfig().start_online_updates == 5_000
    assert compose("train", []).training.start_online_updates == 5_000


def test_online_updates_wait_for_start_online_updates(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "training.offline_steps=2", "training.online_steps=12",
               "training.start_online_updates=8")
    result = Learner(cfg).run()
    assert result.env_steps == 12
    assert result.step == 2 + 4  # env steps 9..12 each did one update


def test_a_dataset_of_another_task_is_refused_before_training(tiny_dataset, tmp_path, capsys):
    """cube-single data (obs 28) for cube-double (obs 37): refused at start, not after training."""
    cfg = _cfg(tiny_dataset, tmp_path / "run", "env=cube-double-task1", "training.online_steps=0",
               "training.eval_episodes=1")
    with pytest.raises(TrainSetupError, match="observation width 28 but cube-double-task1 has 37"):
        Learner(cfg)
    assert run_train(cfg) == 2
    assert "observation width 28" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.csv").exists()
    # Offline only, no env: allowed.
    ok = _cfg(tiny_dataset, tmp_path / "ok", "env=cube-double-task1", "training.online_steps=0",
              "training.offline_steps=1")
    assert Learner(ok).run().step == 1


@pytest.fixture
def image_dataset(tmp_path: Path) -> Path:
    """robomimic-like: a 28-D 'state' and an 8×8×3 uint8 image key; mask/train = demos 0 and 2."""
    path = tmp_path / "img.hdf5"
    rng = np.random.default_rng(0)
    with EpisodeWriter(path, {"task": "cube-single-task1"}) as w:
        for n in (7, 9, 11):
            obs = {"state": rng.normal(size=(n, 28)).astype(np.float32),
                   "agentview_image": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)}
            nxt = {k: v.copy() for k, v in obs.items()}
            w.add_episode(obs, rng.uniform(-1, 1, (n, 5)), np.zeros(n), np.zeros(n), nxt)
        w.set_filter("train", ["demo_0", "demo_2"])
    return path


def test_image_keys_are_left_out_and_filter_key_selects_demos(image_dataset, tmp_path):
    base = ("training.online_steps=0", "training.offline_steps=1")
    default = Learner(_cfg(image_dataset, tmp_path / "a", *base))
    assert default.agent.obs_dim == 28 and default.replay.size == 27
    filtered = Learner(_cfg(image_dataset, tmp_path / "b", *base, "data.filter_key=train"))
    assert filtered.replay.size == 7 + 11
    keyed = Learner(_cfg(image_dataset, tmp_path / "c", *base, "data.obs_keys=[state,agentview_image]"))
    # issue 12: a named image key goes to the conv encoder as uint8, never flattened into the
    # MLP (this line pinned the flattening, 28 + 8·8·3, before)
    assert keyed.agent.obs_dim == 28 and keyed.agent.image_shapes == {"agentview_image": (8, 8, 3)}
    assert keyed.replay.numpy()["images/agentview_image"].dtype == np.uint8


def test_dataset_info_counts_robomimic_success_by_reward(tmp_path):
    """robomimic sets the last ``done`` in every demo (done_mode 1, 2): dones are not success."""
    path = tmp_path / "robomimic.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = 6
        data.attrs["env_args"] = "{}"
        for i, rewards in enumerate(([0, 0, 0], [0, 0, 1])):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = 3
            g["actions"] = np.zeros((3, 2), np.float32)
            g["rewards"] = np.array(rewards, np.float32)
            g["dones"] = np.array([0, 0, 1], np.float32)
            g["obs/x"] = np.zeros((3, 1), np.float32)
            g["next_obs/x"] = np.zeros((3, 1), np.float32)
    assert tools.info(str(path))["success_rate"] == 0.5
