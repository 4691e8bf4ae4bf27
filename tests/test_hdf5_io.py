"""HDF5 episode format: robomimic layout, round trip, flags and errors that name file and key."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from qc_robot.data.hdf5_io import (
    FORMAT,
    DatasetError,
    EpisodeWriter,
    load_flat,
    validate,
)

ENV_ARGS = {"task": "toy", "env_id": "toy-v0", "control_hz": 20.0, "obs_keys": ["a", "b"]}


def _episode(n: int, start: float, done_at: int | None = None) -> dict:
    """Obs key 'b' is (n, 2) and 'a' is (n, 1, 3): flattening and key order both matter."""
    t = start + np.arange(n, dtype=np.float32)
    dones = np.zeros(n, np.float32)
    if done_at is not None:
        dones[done_at] = 1.0
    return dict(
        obs={"b": np.stack([t, -t], 1), "a": np.stack([t, t + 0.5, t + 0.25], 1)[:, None, :]},
        next_obs={
            "b": np.stack([t + 1, -t - 1], 1),
            "a": np.stack([t + 1, t + 1.5, t + 1.25], 1)[:, None, :],
        },
        actions=np.tile(np.linspace(-1, 1, 4, dtype=np.float32), (n, 1)) * (t[:, None] % 2),
        rewards=-np.ones(n, np.float32) + (dones > 0),
        dones=dones,
    )


@pytest.fixture
def two_eps(tmp_path: Path) -> Path:
    path = tmp_path / "two.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        assert w.add_episode(**_episode(5, 0.0, done_at=2), attrs={"seed": 7}) == "demo_0"
        assert w.add_episode(**_episode(3, 100.0)) == "demo_1"
        w.set_filter("train", ["demo_1"])
    return path


def test_layout_readable_with_plain_h5py(two_eps: Path) -> None:
    with h5py.File(two_eps, "r") as f:
        data = f["data"]
        assert data.attrs["total"] == 8
        assert data.attrs["format"] == FORMAT and data.attrs["format_version"] == 1
        assert json.loads(data.attrs["env_args"]) == ENV_ARGS
        assert sorted(data.keys()) == ["demo_0", "demo_1"]
        d0 = data["demo_0"]
        assert d0.attrs["num_samples"] == 5 and d0.attrs["seed"] == 7
        assert d0["actions"].shape == (5, 4) and d0["actions"].dtype == np.float32
        assert d0["rewards"].shape == (5,) and d0["dones"].shape == (5,)
        assert d0["obs/a"].shape == (5, 1, 3) and d0["next_obs/b"].shape == (5, 2)
        assert list(d0["dones"][()]) == [0, 0, 1, 0, 0]
        assert [x.decode() for x in f["mask/train"][()]] == ["demo_1"]


def test_round_trip_flags_and_key_order(two_eps: Path) -> None:
    ds = load_flat(two_eps)
    assert ds.obs_keys == ["a", "b"]  # sorted keys of the first demo
    assert ds.obs_shapes == {"a": (1, 3), "b": (2,)}
    assert ds.observations.shape == (8, 5) and ds.observations.dtype == np.float32
    # Row 1 of demo_0: a = (1, 1.5, 1.25), b = (1, -1); row 0 of demo_1 starts at 100.
    np.testing.assert_array_equal(ds.observations[1], [1, 1.5, 1.25, 1, -1])
    np.testing.assert_array_equal(ds.next_observations[5], [101, 101.5, 101.25, 101, -101])
    np.testing.assert_array_equal(ds.terminals, [0, 0, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(ds.masks, [1, 1, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(ds.rewards, [-1, -1, 0, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(ds.episode_ends, [5, 8])
    assert ds.actions.shape == (8, 4) and ds.env_args == ENV_ARGS

    swapped = load_flat(two_eps, obs_keys=["b", "a"], reward_shift=-1.0)
    np.testing.assert_array_equal(swapped.observations[1], [1, -1, 1, 1.5, 1.25])
    np.testing.assert_array_equal(swapped.rewards[:3], [-2, -2, -1])

    sparse = load_flat(two_eps, sparse_reward=True)
    np.testing.assert_array_equal(sparse.rewards[:3], [-1, -1, 0])
    train = load_flat(two_eps, filter_key="train")
    np.testing.assert_array_equal(train.observations[:, 3], [100, 101, 102])


def test_replay_accepts_flat_dataset(two_eps: Path) -> None:
    from qc_robot.data.replay import ChunkReplay

    ds = load_flat(two_eps)
    replay = ChunkReplay(obs_dim=5, act_dim=4, capacity=16)
    replay.add_offline(ds.as_replay_dict())
    stored = replay.numpy()
    np.testing.assert_array_equal(stored["terminals"], [0, 0, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(stored["next_observations"][4], [5, 5.5, 5.25, 5, -5])


def test_demos_sorted_by_integer_and_append(tmp_path: Path) -> None:
    path = tmp_path / "many.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        for i in range(6):
            w.add_episode(**_episode(2, 10.0 * i))
    with EpisodeWriter(path, ENV_ARGS, mode="a") as w:
        names = [w.add_episode(**_episode(2, 10.0 * i)) for i in range(6, 12)]
    assert names[-1] == "demo_11"
    ds = load_flat(path)
    np.testing.assert_array_equal(
        ds.observations[::2, 3], 10.0 * np.arange(12)
    )  # demo_10 after demo_9
    with pytest.raises(DatasetError, match="env_args"):
        EpisodeWriter(path, {"task": "other"}, mode="a")


def test_incomplete_demo_is_skipped_and_reported(two_eps: Path) -> None:
    # A crash while writing an episode leaves a demo group without num_samples.
    with h5py.File(two_eps, "a") as f:
        g = f["data"].create_group("demo_2")
        g.create_dataset("actions", data=np.zeros((4, 4), np.float32))
    with pytest.warns(UserWarning, match="incomplete"):
        assert len(load_flat(two_eps)) == 8
    problems = validate(two_eps)
    assert len(problems) == 1 and "demo_2" in problems[0]


def test_valid_file_has_no_problems(two_eps: Path) -> None:
    assert validate(two_eps) == []


def _corrupt(path: Path, edit) -> None:
    with h5py.File(path, "a") as f:
        edit(f)


def _replace(f: h5py.File, key: str, value: np.ndarray) -> None:
    del f[key]
    f[key] = value


BAD = {
    "missing rewards": (lambda f: f["data/demo_1"].__delitem__("rewards"), "demo_1/rewards"),
    "missing next_obs key": (lambda f: f["data/demo_0/next_obs"].__delitem__("b"), "next_obs/b"),
    "short rewards": (
        lambda f: _replace(f, "data/demo_1/rewards", np.zeros(2, np.float32)),
        "demo_1/rewards",
    ),
    "1-D actions": (
        lambda f: _replace(f, "data/demo_0/actions", np.zeros(5, np.float32)),
        "demo_0/actions",
    ),
    "obs rows": (
        lambda f: _replace(f, "data/demo_1/obs/a", np.zeros((2, 1, 3), np.float32)),
        "demo_1/obs/a",
    ),
    "obs step shape": (
        lambda f: _replace(f, "data/demo_1/next_obs/b", np.zeros((3, 4), np.float32)),
        "demo_1/next_obs/b",
    ),
    "nan obs": (lambda f: f["data/demo_1/obs/b"].__setitem__((1, 0), np.nan), "demo_1/obs/b"),
    "inf reward": (lambda f: f["data/demo_0/rewards"].__setitem__(3, np.inf), "demo_0/rewards"),
    "total": (lambda f: f["data"].attrs.__setitem__("total", 99), "total"),
    "format": (lambda f: f["data"].attrs.__setitem__("format", "other"), "format"),
    "empty": (lambda f: [f["data"].__delitem__(k) for k in ("demo_0", "demo_1")], "empty"),
    "no data group": (lambda f: f.__delitem__("data"), "'data'"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_inputs_raise_naming_file_and_key(two_eps: Path, kind: str) -> None:
    edit, key = BAD[kind]
    _corrupt(two_eps, edit)
    with pytest.raises(DatasetError) as err:
        load_flat(two_eps)
    assert str(two_eps) in str(err.value) and key in str(err.value)
    problems = validate(two_eps)
    assert problems and key in problems[0]


def test_missing_and_non_hdf5_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.hdf5"
    with pytest.raises(DatasetError, match="not found"):
        load_flat(missing)
    text = tmp_path / "text.hdf5"
    text.write_text("hello")
    with pytest.raises(DatasetError, match="not an HDF5"):
        load_flat(text)
    assert validate(missing) and validate(text)
    assert issubclass(DatasetError, ValueError)


def test_plain_robomimic_file_loads(tmp_path: Path) -> None:
    """robomimic's own files carry no 'format' attr and end with dones = 1."""
    path = tmp_path / "robomimic.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = 3
        data.attrs["env_args"] = json.dumps({"env_name": "Lift"})
        g = data.create_group("demo_0")
        g.attrs["num_samples"] = 3
        g["actions"] = np.zeros((3, 7))
        g["rewards"] = np.array([0.0, 0.0, 1.0])
        g["dones"] = np.array([0, 0, 1])
        g["states"] = np.zeros((3, 10))
        g["obs/object"] = np.ones((3, 10))
        g["next_obs/object"] = np.ones((3, 10))
    ds = load_flat(path, reward_shift=-1.0)
    np.testing.assert_array_equal(ds.rewards, [-1, -1, 0])
    np.testing.assert_array_equal(ds.masks, [1, 1, 0])
    assert ds.env_args == {"env_name": "Lift"}


def test_writer_rejects_inconsistent_episode(tmp_path: Path) -> None:
    ep = _episode(4, 0.0)
    ep["rewards"] = ep["rewards"][:3]
    with (
        EpisodeWriter(tmp_path / "x.hdf5", ENV_ARGS) as w,
        pytest.raises(ValueError, match="rewards"),
    ):
        w.add_episode(**ep)
    assert validate(tmp_path / "x.hdf5")  # no episode written: empty file is reported
