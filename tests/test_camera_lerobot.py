"""LeRobot arms with cameras: LeRobot's own camera features become uint8 image fields, and
qc-robot's threaded cameras attach to a LeRobot driver (real LeRobot SO-101 classes on the
simulated Feetech bus, real OpenCV capture of a generated video file)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from lerobot_env import require_lerobot_arms

require_lerobot_arms()
cv2 = pytest.importorskip("cv2")

from lerobot_rig import calibrated_so101  # noqa: E402

from qc_robot.drivers.camera import CameraConfig  # noqa: E402
from qc_robot.drivers.camera_driver import CameraDriver  # noqa: E402
from qc_robot.drivers.lerobot_driver import LeRobotConfig, LeRobotDriver  # noqa: E402
from qc_robot.drivers.safety import SafeDriver  # noqa: E402


def _red_video(path: Path, n: int, w: int = 40, h: int = 30) -> str:
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (w, h))
    for _ in range(n):
        bgr = np.zeros((h, w, 3), np.uint8)
        bgr[:, :, 2] = 220
        out.write(bgr)
    out.release()
    return str(path)


def test_lerobot_camera_features_become_uint8_image_fields(tmp_path: Path) -> None:
    """A follower configured with LeRobot's own cameras (by config type, as on LeRobot's command
    line): each camera feature is a uint8 (h, w, 3) field. Capture through LeRobot's camera is
    not run: its OpenCV camera refuses any source whose fps/size cannot be *set* (every file)."""
    sim, args = calibrated_so101("follower", tmp_path)
    args["cameras"] = {"front": {"type": "opencv", "index_or_path": 0, "fps": 30, "width": 64, "height": 48},
                       "wrist": {"type": "opencv", "index_or_path": "/dev/video2", "fps": 30, "width": 32,
                                 "height": 32}}
    try:
        d = LeRobotDriver(LeRobotConfig(robot_type="so101_follower", robot_args=args))
        fields = {f.key: (f.shape, f.dtype) for f in d.spec.obs_fields}
        assert fields == {"state": ((6,), "float32"), "front": ((48, 64, 3), "uint8"),
                          "wrist": ((32, 32, 3), "uint8")}
    finally:
        sim.close()


def test_qc_robot_cameras_on_a_lerobot_arm_hold_it_when_stale(tmp_path: Path) -> None:
    sim, args = calibrated_so101("follower", tmp_path)
    video = _red_video(tmp_path / "wrist.avi", 6)
    try:
        arm = LeRobotDriver(LeRobotConfig(robot_type="so101_follower", robot_args=args))
        d = SafeDriver(CameraDriver(arm, [CameraConfig(name="wrist_image", source=video, fps=30, max_age_s=0.6,
                                                       width=20, height=16, loop=True)]))
        d.connect()
        try:
            obs = d.reset()
            assert obs["wrist_image"].shape == (16, 20, 3) and obs["state"].shape == (6,)
            push = np.full(6, 0.5, np.float32)
            d.get_observation()
            assert np.abs(d.act(push)).max() > 0  # current camera: the arm moves
            before = arm.target
            cam = d.driver.cameras[0]
            cam.stop()  # the camera stalls
            deadline = time.monotonic() + 5.0
            while d.get_observation() is not None and d.sensor_fault is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            np.testing.assert_array_equal(d.act(push), np.zeros(6, np.float32))  # delta hold
            np.testing.assert_allclose(arm.target, before)  # the joint targets did not move
        finally:
            d.close()
    finally:
        sim.close()
