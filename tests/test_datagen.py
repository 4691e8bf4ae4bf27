"""Play-data generation: real MuJoCo rollouts, labels checked against the singletask env itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import h5py
import numpy as np
import pytest

from qc_robot.config import DataConfig, DatagenConfig, EnvConfig
from qc_robot.data.hdf5_io import load_flat, validate
from qc_robot.sim.datagen import generate, label_episode, run_datagen
from qc_robot.sim.tasks import task_spec


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dg") / "scene.hdf5"
    generate(
        "scene-task2",
        num_episodes=2,
        episode_length=50,
        noise=0.1,
        seed=0,
        out_path=str(out),
        progress=False,
    )
    return out


def _eval_env(name: str) -> gymnasium.Env:
    env = gymnasium.make(task_spec(name).singletask_env_id)
    env.reset(seed=0)
    return env


def test_file_loads_with_expected_structure(scene_file: Path) -> None:
    assert validate(scene_file) == []
    ds = load_flat(scene_file)
    spec = task_spec("scene-task2")
    assert ds.observations.shape == (100, spec.obs_dim) and ds.actions.shape == (100, 5)
    assert ds.obs_keys == ["state"] and ds.env_args["task"] == "scene-task2"
    assert ds.env_args["control_hz"] == 20.0
    np.testing.assert_array_equal(ds.episode_ends, [50, 100])
    np.testing.assert_array_equal(np.flatnonzero(ds.terminals), [49, 99])  # time limit only
    assert np.all(np.abs(ds.actions) <= 1.0)
    # Transitions chain inside each episode, and episodes start fresh.
    np.testing.assert_array_equal(ds.next_observations[:49], ds.observations[1:50])
    assert not np.allclose(ds.next_observations[49], ds.observations[50])


def test_rewards_match_singletask_env_on_stored_states(scene_file: Path) -> None:
    """Re-evaluate the task reward with the OGBench env's own compute_reward on each state."""
    env = _eval_env("scene-task2")
    u: Any = env.unwrapped
    with h5py.File(scene_file, "r") as f:
        for demo in ("demo_0", "demo_1"):
            g = f["data"][demo]
            states, buttons = g["states"][()], g["button_states"][()]
            rewards, dones = g["rewards"][()], g["dones"][()]
            nq = int(g.attrs["nq"])
            expected = []
            for s, b in zip(states, buttons, strict=True):
                u.set_state(s[:nq], s[nq:], b)
                expected.append(u.compute_reward())
            np.testing.assert_array_equal(rewards, expected)
            np.testing.assert_array_equal(dones, np.asarray(expected) == 0.0)
    # The play data must exercise the label: several distinct reward levels.
    assert len(np.unique(load_flat(scene_file).rewards)) >= 2


def test_labels_mark_success_states() -> None:
    """States with the cubes on their goals get reward 0 and done 1, the others not."""
    spec = task_spec("cube-double-task2")
    env = _eval_env("cube-double-task2")
    u: Any = env.unwrapped
    qpos = np.tile(u._data.qpos.copy(), (3, 1))  # (3, nq) the task's initial state
    goals = u._data.mocap_pos.copy()  # (2, 3) cube targets
    qpos[1, 14:17], qpos[1, 21:24] = goals[0], goals[1]  # both cubes on target
    qpos[2, 14:17] = goals[0]  # one cube on target
    rewards, dones = label_episode(spec, env, qpos, None)
    np.testing.assert_array_equal(rewards, [-2.0, 0.0, -1.0])
    np.testing.assert_array_equal(dones, [0.0, 1.0, 0.0])


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    state: Any = np.random.get_state()
    paths = [
        generate("cube-single-task1", 2, 40, 0.1, seed, str(tmp_path / f"{i}.hdf5"), progress=False)
        for i, seed in enumerate([3, 3, 4])
    ]
    after: Any = np.random.get_state()
    assert np.array_equal(after[1], state[1])  # global RNG left as it was
    a, b, c = (load_flat(p) for p in paths)
    for k, v in a.as_replay_dict().items():
        np.testing.assert_array_equal(v, b.as_replay_dict()[k], err_msg=k)
    assert not np.array_equal(a.observations, c.observations)
    assert not np.array_equal(a.actions, c.actions)
    # The stored MuJoCo state is the observed (pre-action) one: the cube position in obs matches.
    with h5py.File(paths[0], "r") as f:
        states = np.concatenate([f[f"data/demo_{i}/states"][()] for i in range(2)])  # (80, nq+nv)
    cube_xyz = (states[:, 14:17] - np.array([0.425, 0.0, 0.0])) * 10.0  # OGBench obs scaling
    np.testing.assert_allclose(a.observations[:, 19:22], cube_xyz, atol=1e-5)


def test_puzzle_generates(tmp_path: Path) -> None:
    p = generate("puzzle-3x3-task1", 1, 30, 0.1, 0, str(tmp_path / "p.hdf5"), progress=False)
    ds = load_flat(p)
    assert ds.observations.shape == (30, task_spec("puzzle-3x3-task1").obs_dim)
    assert set(np.unique(ds.rewards)) <= set(-np.arange(10.0))


def test_run_datagen_cli_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DatagenConfig(
        env=EnvConfig(name="cube-single-task2"),
        data=DataConfig(path=str(tmp_path / "${env.name}.hdf5"), num_episodes=1, episode_length=20),
        progress=False,
    )
    assert run_datagen(cfg) == 0
    out = capsys.readouterr().out
    assert "1 episodes, 20 transitions" in out and "cube-single-task2.hdf5" in out
    assert len(load_flat(tmp_path / "cube-single-task2.hdf5")) == 20


def test_task_directed_play_contains_solved_tasks(tmp_path):
    """Plain play rarely solves a cube-double task; task-directed targets make solved states appear."""
    plain = generate("cube-double-task1", 1, 300, 0.1, 3, str(tmp_path / "plain.hdf5"), progress=False)
    directed = generate("cube-double-task1", 1, 300, 0.1, 3, str(tmp_path / "directed.hdf5"),
                        progress=False, task_goal_prob=1.0)
    solved_plain = float(np.sum(load_flat(plain).masks == 0))
    solved_directed = float(np.sum(load_flat(directed).masks == 0))
    assert solved_directed > solved_plain
    assert solved_directed > 0
