"""`qc-robot dataset import|export` against LeRobot's own dataset writer and loader (issue 27).

The LeRobotDatasets are written by LeRobot's ``LeRobotDataset`` (v2.1 with LeRobot 0.3.x, v3.0 with
0.4.x, whichever is installed: CI runs this file under both); the exports are read back by
LeRobot's ``LeRobotDataset`` loader. Skips cleanly where LeRobot or its dataset stack is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from lerobot_datasets import (
    FPS,
    JOINTS,
    LENGTHS,
    action,
    grey,
    lerobot_dataset_class,
    make_dataset,
    state,
)

from qc_robot.cli import main


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lr") / "plain")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lr") / "video", camera="video")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lr") / "images", camera="image", rewards=False)


def _import(src: Path, out: Path, *extra: str) -> Path:
    assert main(["dataset", "import", str(src), f"out={out}", *extra]) == 0
    return out


def _demos(path: Path) -> list[h5py.Group]:
    f = h5py.File(path, "r")
    return [f["data"][f"demo_{i}"] for i in range(len(f["data"]))]


def _raw(x: np.ndarray, n: dict) -> np.ndarray:
    lo, hi = np.asarray(n["low"]), np.asarray(n["high"])
    return lo + (x + 1.0) * 0.5 * (hi - lo)


def test_import_keeps_states_actions_episodes_tasks_rewards_and_rate(plain, tmp_path, capsys):
    out = _import(plain, tmp_path / "plain.hdf5")
    assert "imported 3 episodes (18 frames, 10 Hz)" in capsys.readouterr().out
    demos = _demos(out)
    env = json.loads(demos[0].file["data"].attrs["env_args"])
    assert env["control_hz"] == FPS and env["reward_source"] == "recorded" and env["tasks"] == ["task 0", "task 1", "task 2"]
    assert env["names"]["action"] == JOINTS and env["robot_type"] == "so101_follower"
    from importlib.metadata import version

    lerobot_04 = tuple(int(x) for x in version("lerobot").split(".")[:2]) >= (0, 4)
    assert env["lerobot_version"] == ("v3.0" if lerobot_04 else "v2.1")  # the layout LeRobot's writer chose
    assert [int(d.attrs["num_samples"]) for d in demos] == LENGTHS  # episode boundaries
    for e, d in enumerate(demos):
        n = LENGTHS[e]
        acts = d["actions"][()]
        assert acts.min() >= -1.0 and acts.max() <= 1.0  # the agent's range
        np.testing.assert_allclose(_raw(acts, env["normalization"]["action"]), [action(e, t) for t in range(n)], atol=1e-4)
        s = _raw(d["obs/state"][()], env["normalization"]["state"])  # named like the actions: same map
        np.testing.assert_allclose(s, [state(e, t) for t in range(n)], atol=1e-4)
        np.testing.assert_array_equal(d["next_obs/state"][:-1], d["obs/state"][1:])
        assert d.attrs["task"] == f"task {e}" and d.attrs["lerobot_episode_index"] == e
        won = e % 2 == 0
        assert d.attrs["success"] == won and d.attrs["label"] == ("success" if won else "failure")
        np.testing.assert_array_equal(d["rewards"][()], [float(won and t == n - 1) for t in range(n)])
        np.testing.assert_array_equal(d["dones"][()], d["rewards"][()])  # next.success: true termination
    assert main(["dataset", "validate", str(out)]) == 0


def test_import_decodes_the_camera_videos_at_the_chosen_size(video, tmp_path):
    small = _demos(_import(video, tmp_path / "small.hdf5", "image_size=16"))
    native = _demos(_import(video, tmp_path / "native.hdf5", "image_size=0"))
    for e, (d, full) in enumerate(zip(small, native, strict=True)):
        frames = d["obs/front"][()]
        assert frames.shape == (LENGTHS[e], 16, 16, 3) and frames.dtype == np.uint8
        assert full["obs/front"].shape == (LENGTHS[e], 24, 32, 3)
        want = np.array([grey(e, t) for t in range(LENGTHS[e])], np.float64)
        np.testing.assert_allclose(frames.reshape(len(frames), -1).mean(1), want, atol=6)  # lossy video
        np.testing.assert_array_equal(d["next_obs/front"][:-1], frames[1:])


def test_import_without_rewards_takes_verdicts(images, tmp_path):
    demos = _demos(_import(images, tmp_path / "ok.hdf5"))
    env = json.loads(demos[0].file["data"].attrs["env_args"])
    assert env["reward_source"] == "verdict" and all(d.attrs["label"] == "success" for d in demos)
    np.testing.assert_array_equal(demos[1]["obs/front"][0], np.full((64, 64, 3), grey(1, 0)))  # PNG frames: exact
    failed = _demos(_import(images, tmp_path / "bad.hdf5", "label=failure", "normalize=false"))
    assert all(d.attrs["label"] == "failure" for d in failed)
    np.testing.assert_array_equal(failed[2]["actions"][()], [action(2, t) for t in range(LENGTHS[2])])


def _broken(src: Path, tmp_path: Path, edit) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _info_edit(**change):
    def edit(root: Path) -> None:
        p = root / "meta" / "info.json"
        info = json.loads(p.read_text())
        for k, v in change.items():
            if v is None:
                info["features"].pop(k)
            else:
                info[k] = v
        p.write_text(json.dumps(info))
    return edit


@pytest.mark.parametrize("edit,message", [
    (_info_edit(codebase_version="v1.6"), "codebase_version 'v1.6' is not one of"),
    (_info_edit(action=None), "no 'action' feature"),
    (lambda r: [p.unlink() for p in (r / "data").glob("**/*.parquet")], "no parquet files"),
    (lambda r: (r / "meta" / "info.json").unlink(), "meta/info.json: missing"),
])
def test_bad_lerobot_folders_are_one_line_and_exit_2(plain, tmp_path, capsys, edit, message):
    src = _broken(plain, tmp_path, edit)
    assert main(["dataset", "import", str(src), f"out={tmp_path / 'x.hdf5'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "x.hdf5").exists()


def test_a_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["dataset", "import", str(tmp_path / "nowhere"), f"out={tmp_path / 'x.hdf5'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and len(err.splitlines()) == 1
    assert main(["dataset", "import", str(tmp_path)]) == 2  # no out=
    assert "out=FILE.hdf5" in capsys.readouterr().err


def _loaded(root: Path) -> list[dict]:
    ds = lerobot_dataset_class()("local/qc-robot-export", root=root)
    return [ds[i] for i in range(len(ds))]


def test_export_round_trip_through_lerobots_loader(plain, tmp_path, capsys):
    h5 = _import(plain, tmp_path / "plain.hdf5")
    out = tmp_path / "exported"
    assert main(["dataset", "export", str(h5), f"out={out}"]) == 0
    assert "exported 3 episodes (18 frames, 10 Hz)" in capsys.readouterr().out
    rows = _loaded(out)
    assert len(rows) == sum(LENGTHS)
    episodes = [int(r["episode_index"]) for r in rows]
    assert episodes == [e for e, n in enumerate(LENGTHS) for _ in range(n)]  # the same boundaries
    i = 0
    for e, n in enumerate(LENGTHS):
        for t in range(n):
            r = rows[i]
            np.testing.assert_allclose(r["action"].numpy(), action(e, t), atol=1e-4)  # back in LeRobot's units
            np.testing.assert_allclose(r["observation.state"].numpy(), state(e, t), atol=1e-4)
            last = e % 2 == 0 and t == n - 1
            assert float(r["next.reward"]) == float(last) and bool(r["next.success"]) == last
            assert r["task"] == f"task {e}" and int(r["frame_index"]) == t
            i += 1
    assert main(["dataset", "export", str(h5), f"out={out}"]) == 2  # never over an existing folder
    assert "already exists" in capsys.readouterr().err


def test_exported_camera_frames_round_trip(images, video, tmp_path):
    """PNG frames come back from LeRobot's loader unchanged; an MP4 export re-imports to the same greys."""
    h5 = _import(images, tmp_path / "images.hdf5", "image_size=0")
    out = tmp_path / "png"
    assert main(["dataset", "export", str(h5), f"out={out}", "use_videos=false"]) == 0
    rows = _loaded(out)
    frames = np.stack([(r["observation.images.front"].numpy() * 255).round().astype(np.uint8) for r in rows])
    assert frames.shape == (sum(LENGTHS), 3, 24, 32)  # LeRobot's loader gives (C, H, W)
    want = [grey(e, t) for e, n in enumerate(LENGTHS) for t in range(n)]
    np.testing.assert_array_equal(frames.reshape(len(frames), -1).min(1), want)
    np.testing.assert_array_equal(frames.reshape(len(frames), -1).max(1), want)

    h5v = _import(video, tmp_path / "video.hdf5", "image_size=0")
    assert main(["dataset", "export", str(h5v), f"out={tmp_path / 'mp4'}"]) == 0
    again = _demos(_import(tmp_path / "mp4", tmp_path / "again.hdf5", "image_size=0"))
    assert [int(d.attrs["num_samples"]) for d in again] == LENGTHS
    for e, d in enumerate(again):
        means = d["obs/front"][()].reshape(LENGTHS[e], -1).mean(1)
        np.testing.assert_allclose(means, [grey(e, t) for t in range(LENGTHS[e])], atol=8)  # encoded twice


def test_our_sim_recording_opens_in_lerobots_loader(tiny_dataset, tmp_path):
    """Data qc-robot made (datagen, cube-single-task1) → LeRobotDataset → LeRobot's loader."""
    from qc_robot.data.hdf5_io import load_flat

    lerobot_dataset_class()  # or skip
    out = tmp_path / "sim"
    assert main(["dataset", "export", str(tiny_dataset), f"out={out}"]) == 0
    rows = _loaded(out)
    ours = load_flat(tiny_dataset)
    assert len(rows) == len(ours)
    np.testing.assert_allclose(np.stack([r["action"].numpy() for r in rows]), ours.actions, atol=1e-6)
    np.testing.assert_allclose(np.stack([r["observation.state"].numpy() for r in rows]), ours.observations, atol=1e-6)
    np.testing.assert_allclose(np.stack([float(r["next.reward"]) for r in rows]), ours.rewards, atol=1e-6)
    ends = np.flatnonzero(np.diff([int(r["episode_index"]) for r in rows])) + 1
    np.testing.assert_array_equal(ends, ours.episode_ends[:-1])
    assert rows[0]["task"] == "cube-single-task1"


def test_train_on_an_imported_dataset_with_its_camera(video, tmp_path, capsys):
    """`train data.path=<imported>.hdf5` with the camera as an image observation, offline only (no
    sim env for a LeRobot arm), then export of the checkpoint to ONNX."""
    h5 = _import(video, tmp_path / "so101.hdf5", "image_size=32")
    run = tmp_path / "run"
    assert main(["train", "experiment=smoke", f"data.path={h5}", f"training.run_dir={run}",
                 "training.offline_steps=3", "training.online_steps=0", "training.eval_episodes=0",
                 "data.obs_keys=[state,front]", "agent.horizon=2"]) == 0
    assert "done: 3 updates" in capsys.readouterr().out
    assert main(["export", f"checkpoint={run / 'checkpoint.pt'}", f"out={tmp_path / 'model.onnx'}"]) == 0
    from qc_robot.policies.onnx_policy import OnnxPolicy

    meta = OnnxPolicy(str(tmp_path / "model.onnx")).meta
    fields = {f.key: tuple(f.shape) for f in meta.obs_fields}
    assert fields == {"state": (len(JOINTS),), "front": (32, 32, 3)} and meta.control_hz == FPS
