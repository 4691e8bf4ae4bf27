"""Camera images from the MuJoCo sim: OGBench-identical rendering, the sim driver's image
observations, and images recorded into HDF5 by datagen and teleop (robomimic layout, uint8 HWC,
one gzip chunk per frame). Real MuJoCo, real EGL rendering, real HDF5; tiny images, few frames
(a frame costs 35-700 ms on this CPU)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytest.importorskip("ogbench")


pytestmark = pytest.mark.usefixtures("offscreen_gl")  # every test here renders: skipped without GL


def test_visual_task_registry_names_ogbench_visual_envs() -> None:
    from qc_robot.sim.tasks import list_tasks, task_spec

    spec = task_spec("visual-cube-single-task1")
    assert spec.visual and spec.env_id == "visual-cube-single-play-singletask-task1-v0"
    assert spec.play_env_id == "visual-cube-single-v0" and spec.default_image_size == 64
    assert spec.singletask_env_id == "cube-single-singletask-task1-v0"  # labels: the same physics
    assert (spec.obs_dim, spec.max_episode_steps) == (task_spec("cube-single-task1").obs_dim, 200)
    assert not task_spec("cube-single-task1").visual and task_spec("cube-single-task1").default_image_size == 0
    assert "visual-puzzle-4x4-task5" in list_tasks() and "visual-scene-task2" in list_tasks()


@pytest.mark.slow  # four full-quality OGBench renders: ~20 s under load here
def test_sim_camera_is_pixel_identical_to_ogbench_pixel_observation() -> None:
    """OGBench's own visual env renders its observation at 32x32; our camera on the same state
    (its own renderer, on its own GL thread) gives the same bytes."""
    import gymnasium
    import ogbench  # noqa: F401

    from qc_robot.sim.camera import SimCamera

    env = gymnasium.make("visual-cube-single-singletask-task1-v0", width=32, height=32)
    ob, _ = env.reset(seed=3)
    assert ob.shape == (32, 32, 3) and ob.dtype == np.uint8
    cam = SimCamera(env.unwrapped, 32, 32)
    try:
        frame = cam.render()
        np.testing.assert_array_equal(frame, ob)
        with pytest.raises(ValueError, match="camera 'nope' is not in the model"):
            SimCamera(env.unwrapped, 8, 8, camera="nope").render()
    finally:
        cam.close()
        env.close()


def test_sim_driver_observes_state_and_image_lockstep() -> None:
    from qc_robot.drivers.sim import SimConfig, SimDriver
    from qc_robot.protocol import Hello, decode, encode

    d = SimDriver(SimConfig(env="visual-cube-single-task1", image_size=32, render_fast=True, realtime=False))
    keys = {f.key: (f.shape, f.dtype) for f in d.spec.obs_fields}
    assert keys == {"state": ((28,), "float64"), "image": ((32, 32, 3), "uint8")}
    hello = decode(encode(d.spec.hello("sim")))
    assert isinstance(hello, Hello) and {"key": "image", "shape": [32, 32, 3], "dtype": "uint8"} in hello.obs_spec
    try:
        o0 = d.reset(seed=0)
        assert o0["image"].shape == (32, 32, 3) and o0["image"].dtype == np.uint8 and o0["image"].std() > 5
        for _ in range(2):
            d.send_action(np.array([1.0, 0.0, -1.0, 0.0, 0.0], np.float32))  # move the arm
        o2 = d.get_observation()
        assert not np.array_equal(o2["image"], o0["image"])  # the camera sees the arm move
        o2["image"][:] = 0  # a caller's copy: the driver's frame is untouched
        assert d.get_observation()["image"].std() > 5
        assert d.reset(seed=0)["image"].tobytes() == o0["image"].tobytes()  # same seed, same picture
    finally:
        d.close()


def test_realtime_sim_logs_each_tick_with_its_own_frames() -> None:
    """The wall-clock sim renders inside each tick: a logged row's next image is the next row's
    image, and what get_observation returns matches the newest row (one reading per tick)."""
    from qc_robot.drivers.sim import SimConfig, SimDriver

    d = SimDriver(SimConfig(env="cube-single-task1", image_size=16, render_fast=True, time_scale=20.0))
    try:
        d.reset(seed=0)
        d.send_action(np.array([1.0, 0.0, -1.0, 0.0, 0.0], np.float32))
        assert d.wait_step(3, 30.0)
        rows = d.executed_steps()
        obs = d.get_observation()
    finally:
        d.close()
    assert rows is not None and len(rows) >= 3
    for a, b in zip(rows, rows[1:], strict=False):
        np.testing.assert_array_equal(a.next_obs["image"], b.obs["image"])
        np.testing.assert_array_equal(a.next_obs["state"], b.obs["state"])
    assert rows[-1].next_obs["image"].shape == (16, 16, 3) and rows[-1].next_obs["image"].dtype == np.uint8
    if d.step_info().step == rows[-1].step + 1:
        np.testing.assert_array_equal(obs["image"], rows[-1].next_obs["image"])
    assert not np.array_equal(rows[0].obs["image"], rows[-1].next_obs["image"])  # the arm moved


def test_state_task_has_no_image_unless_asked() -> None:
    from qc_robot.drivers.sim import SimConfig, SimDriver

    assert [f.key for f in SimDriver(SimConfig(env="cube-single-task1")).spec.obs_fields] == ["state"]
    d = SimDriver(SimConfig(env="cube-single-task1", image_size=16, image_key="agentview_image",
                            render_fast=True, realtime=False))
    assert [f.key for f in d.spec.obs_fields] == ["state", "agentview_image"]
    with pytest.raises(ValueError, match="image_key and obs_key"):
        SimDriver(SimConfig(env="cube-single-task1", image_size=16, image_key="state"))


def test_datagen_records_images_in_the_robomimic_layout(tmp_path) -> None:
    """obs/image (N, S, S, 3) uint8, one gzip chunk per frame, next_obs/image continues obs/image
    (one env costs ~6 s to build here, so the rendering itself is checked against OGBench in the
    slow test above and against the driver's state below)."""
    from qc_robot.sim.datagen import generate

    out = tmp_path / "visual.hdf5"
    generate("visual-cube-single-task1", num_episodes=1, episode_length=2, noise=0.1, seed=0,
             out_path=str(out), progress=False, image_size=16, render_fast=True)
    with h5py.File(out) as f:
        d = f["data/demo_0"]
        img, nxt = d["obs/image"], d["next_obs/image"]
        assert img.shape == nxt.shape == (2, 16, 16, 3) and img.dtype == np.uint8
        assert img.chunks == (1, 16, 16, 3) and img.compression == "gzip"
        assert d["obs/state"].dtype == np.float32 and d["obs/state"].shape == (2, 28)
        np.testing.assert_array_equal(img[1:], nxt[:-1])
        assert not np.array_equal(img[0], nxt[-1])  # the arm moved
        assert f["data"].attrs["env_args"].count('"image_key": "image"') == 1


def test_teleop_records_the_camera_into_hdf5(tmp_path) -> None:
    from qc_robot.config import EnvConfig
    from qc_robot.data.hdf5_io import validate
    from qc_robot.teleop.config import TeleopConfig
    from qc_robot.teleop.session import run_teleop

    out = str(tmp_path / "demos.hdf5")
    cfg = TeleopConfig(driver="sim", env=EnvConfig(name="cube-single-task1", image_size=16, render_fast=True),
                       device="scripted", out=out, realtime=False, time_scale=1000.0, end_after=3,
                       outcomes=["failure"], episodes=1, status=False)
    assert run_teleop(cfg) == 0
    assert validate(out) == []
    with h5py.File(out) as f:
        d = f["data/demo_0"]
        assert d["obs/image"].shape == (3, 16, 16, 3) and d["obs/image"].dtype == np.uint8
        assert d["obs/image"].chunks == (1, 16, 16, 3) and d["obs/image"].compression == "gzip"
        np.testing.assert_array_equal(d["obs/image"][1:], d["next_obs/image"][:-1])
        assert d["obs/image"][()].std() > 5
