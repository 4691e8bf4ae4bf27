"""Robot-side cameras with real OpenCV capture (cv2.VideoCapture on generated video files and
image sequences; no device here): RGB frames, timestamps, a loop that never blocks, stale and
ended sources as sensor faults that the safety layer turns into holds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from qc_robot import protocol as P  # noqa: E402
from qc_robot.drivers.base import SensorError  # noqa: E402
from qc_robot.drivers.camera import CameraConfig, OpenCVCamera, make_camera  # noqa: E402
from qc_robot.drivers.camera_driver import CameraDriver  # noqa: E402
from qc_robot.drivers.mock import MockConfig, MockDriver  # noqa: E402
from qc_robot.drivers.safety import SafeDriver  # noqa: E402


def _video(path: Path, n: int, size: tuple[int, int] = (40, 30)) -> Path:
    """An MJPG .avi of ``n`` frames: frame i is pure red (RGB) with a bar whose width is i."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    for i in range(n):
        bgr = np.zeros((size[1], size[0], 3), np.uint8)
        bgr[:, :, 2] = 220  # red, in OpenCV's BGR order
        bgr[:4, : 2 * (i + 1), 1] = 255  # a green bar that grows: frames are told apart
        w.write(bgr)
    w.release()
    return path


def _wait_for(pred, timeout: float = 60.0) -> None:
    """Poll ``pred``; the timeout is a hang guard only (generous: a loaded machine is slow)."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_video_file_frames_are_rgb_timestamped_and_newest(tmp_path: Path) -> None:
    cam = OpenCVCamera(CameraConfig(name="front", source=str(_video(tmp_path / "v.avi", 30)), fps=50,
                                    max_age_s=1.0, width=20, height=16, loop=True))
    cam.start()
    try:
        f1 = cam.latest()
        assert f1.image.shape == (16, 20, 3) and f1.image.dtype == np.uint8  # resized to the config
        r, g, b = (float(f1.image[8:, :, c].mean()) for c in range(3))
        assert r > 180 and g < 40 and b < 40  # RGB, not OpenCV's BGR
        _wait_for(lambda: cam.latest().seq >= f1.seq + 3)
        f2 = cam.latest(now=0.0)  # a read "at time 0" looks at the newest frame, not at its age
        assert f2.t > f1.t and f2.seq > f1.seq  # timestamps and sequence move on
    finally:
        cam.stop()


def test_image_sequence_source_ends_as_a_failure_not_a_repeat(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f_{i:03d}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    cam = make_camera(CameraConfig(name="seq", source=str(tmp_path / "f_%03d.png"), fps=50, max_age_s=5.0))
    cam.start()
    try:
        assert cam.latest().image.shape == (8, 8, 3)
        _wait_for(lambda: cam.frames == 3)
        _wait_for(lambda: cam._error is not None)
        with pytest.raises(SensorError, match="ended"):
            cam.latest()  # the last frame is still there, but it is never handed out again
        assert cam.frames == 3
    finally:
        cam.stop()


class _StallingCamera(OpenCVCamera):
    """Real OpenCV capture whose device can be made to hang inside a read (a stalled USB camera)."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        self.stall, self.stalled, self.resume = threading.Event(), threading.Event(), threading.Event()

    def _read(self) -> np.ndarray | None:
        if self.stall.is_set():
            self.stalled.set()
            self.resume.wait(120)
        return super()._read()


def test_slow_camera_frames_go_stale_between_frames_without_blocking(tmp_path: Path) -> None:
    """max_age_s 0.05: a frame is fresh for 50 ms after its capture and stale after (ages given
    explicitly, so the machine's load does not decide); a read while the device hangs in its own
    read returns at once, the last frame or a stale error, never waiting for the device."""
    cam = _StallingCamera(CameraConfig(source=str(_video(tmp_path / "v.avi", 10)), fps=4, max_age_s=0.05, loop=True))
    cam.start()
    try:
        _wait_for(lambda: cam.frames >= 1)
        cam.stall.set()
        _wait_for(cam.stalled.is_set)  # the capture thread now hangs inside the device read
        frame = cam.latest(now=0.0)  # (a read "at time 0" only looks at the newest frame)
        assert cam.latest(now=frame.t + 0.04) is frame
        with pytest.raises(SensorError, match="old"):
            cam.latest(now=frame.t + 0.06)
        results: list[object] = []
        reader = threading.Thread(target=lambda: results.extend(_read_or_error(cam) for _ in range(200)))
        reader.start()
        reader.join(60)  # hang guard: a read that waited for the device would never return
        assert not reader.is_alive() and len(results) == 200
        assert all(r is frame or (isinstance(r, SensorError) and "old" in str(r)) for r in results)
    finally:
        cam.resume.set()
        cam.stop()


def _read_or_error(cam: OpenCVCamera) -> object:
    try:
        return cam.latest()
    except SensorError as e:
        return e


def test_a_camera_that_cannot_open_is_a_clear_error(tmp_path: Path) -> None:
    cam = OpenCVCamera(CameraConfig(name="wrist", source=str(tmp_path / "missing.avi"), open_timeout_s=2.0))
    with pytest.raises(SensorError, match="camera 'wrist'.*cannot open"):
        cam.start()
    with pytest.raises(ValueError, match="kind must be one of"):
        CameraConfig(kind="webcam")
    with pytest.raises(ValueError, match="set width and height"):
        CameraDriver(MockDriver(MockConfig()), [{"name": "x", "source": "0"}])


def _stale(cam: object) -> bool:
    try:
        cam.latest()  # type: ignore[attr-defined]
    except SensorError:
        return True
    return False


def test_safety_layer_holds_while_a_camera_is_stale_and_resumes(tmp_path: Path) -> None:
    """A mock arm with a looping camera whose capture then stops (a stalled device): once its
    newest frame is older than max_age_s the loop still gets an observation (the last good one,
    flagged), every action becomes the hold, and nothing moves the arm; a new episode restarts it."""
    src = str(_video(tmp_path / "v.avi", 6))
    driver = SafeDriver(CameraDriver(MockDriver(MockConfig()), [CameraConfig(
        name="agentview_image", source=src, fps=30, max_age_s=0.6, width=16, height=12, loop=True)]))
    spec = {f.key: (f.shape, f.dtype) for f in driver.spec.obs_fields}
    assert spec["agentview_image"] == ((12, 16, 3), "uint8") and "state" in spec
    driver.connect()
    cam = driver.driver.cameras[0]
    try:
        obs = driver.reset(seed=0)
        assert obs["agentview_image"].shape == (12, 16, 3) and driver.sensor_fault is None
        push = np.full(driver.spec.action_dim, 0.5, np.float32)
        driver.get_observation()
        np.testing.assert_allclose(driver.act(push), push)  # current camera: the action is applied
        cam.stop()  # no more frames
        _wait_for(lambda: _stale(cam))
        before = driver.get_observation()
        assert driver.sensor_fault is not None and "old" in driver.sensor_fault
        assert before["agentview_image"].shape == (12, 16, 3)  # the loop still has an observation
        held = driver.act(push)
        np.testing.assert_array_equal(held, driver.driver.hold_action())
        assert driver.stats.sensor_holds == 1 and driver.stats.sensor_faults >= 1
        arm = driver.driver.driver  # the mock itself, under the camera wrapper
        state_before = arm.get_observation()["state"].copy()
        driver.act(push)
        np.testing.assert_array_equal(arm.get_observation()["state"], state_before)  # the arm did not move
        driver.reset(seed=1)  # a new episode restarts the camera: current again, actions flow
        assert driver.sensor_fault is None
        np.testing.assert_allclose(driver.act(push), push)
    finally:
        driver.close()


def test_served_episode_holds_from_the_camera_fault_on(tmp_path: Path) -> None:
    """A real server and control loop: images travel in every step's row; once the camera stops
    delivering mid-episode (stale), every later step is held and no chunk is asked for."""
    from qc_robot.drivers.client import PolicyClient
    from qc_robot.drivers.executor import ChunkExecutor
    from qc_robot.drivers.runner import run_episode
    from qc_robot.server.app import ControlServer
    from qc_robot.server.serve import load_policy

    srv = ControlServer(load_policy("hold:28:5:5"), "tcp://127.0.0.1:*").start()
    cam = CameraConfig(name="agentview_image", source=str(_video(tmp_path / "v.avi", 6)), fps=30, max_age_s=0.5,
                       width=16, height=12, loop=True)
    driver = SafeDriver(CameraDriver(MockDriver(MockConfig(obs_dim=28, max_episode_steps=30)), [cam]))
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("mock"))
    try:
        client.connect(5.0)
        ex = ChunkExecutor(client, 5, "open_loop", wait_when_empty=True)
        rows: list = []

        def on_rows(new: list) -> None:
            rows.extend(new)
            if len(rows) == 10:  # the camera stalls here
                stream = driver.driver.cameras[0]
                stream.stop()
                _wait_for(lambda: _stale(stream))

        res = run_episode(driver, ex, 0, 0, None, client, on_rows=on_rows)
        requests_at_fault = ex.stats.requests
    finally:
        client.close()
        driver.close()
        srv.stop()
    assert res.steps == 30 and all(r.obs["agentview_image"].shape == (12, 16, 3) for r in rows)
    assert not any(r.held for r in rows[:10])
    assert all(r.held for r in rows[11:]) and driver.stats.sensor_faults >= 19
    assert requests_at_fault == 3  # chunks for steps 0, 5 and 10 (read before the fault); none after it


def test_transitions_with_images_are_split_to_fit_the_servers_limit(tmp_path: Path) -> None:
    """128x128 frames make a 5-step transition ~0.5 MB; a server advertising a 0.3 MB limit gets
    them as consecutive messages that all fit (none refused or dropped), covering every step.
    Observations carry only the keys the policy reads."""
    from qc_robot.drivers.client import PolicyClient
    from qc_robot.drivers.executor import ChunkExecutor
    from qc_robot.drivers.runner import run_episode
    from qc_robot.server.app import ControlServer
    from qc_robot.server.episode_log import EpisodeLogger
    from qc_robot.server.serve import load_policy

    logger = EpisodeLogger(str(tmp_path / "log"), {"test": True})
    srv = ControlServer(load_policy("hold:28:5:5"), "tcp://127.0.0.1:*", episode_logger=logger,
                        max_message_bytes=300_000).start()
    cam = CameraConfig(name="agentview_image", source=str(_video(tmp_path / "v.avi", 30, (128, 128))), fps=30,
                       max_age_s=5.0, width=128, height=128, loop=True)
    driver = SafeDriver(CameraDriver(MockDriver(MockConfig(obs_dim=28, max_episode_steps=12)), [cam]))
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("mock"))
    sent: list = []
    original = client.send_transition
    client.send_transition = lambda tr: sent.append(tr) or original(tr)  # type: ignore[method-assign]
    try:
        client.connect(5.0)
        assert client.welcome is not None and client.welcome.log_transitions
        observed: list[set[str]] = []
        send = client._send
        client._send = lambda m: (observed.append(set(m.obs)) if isinstance(m, P.Observation) else None) \
            or send(m)  # type: ignore[method-assign]
        res = run_episode(driver, ChunkExecutor(client, 5, "open_loop", wait_when_empty=True), 0, 0, None, client,
                          send_transitions=True)
        end = time.monotonic() + 60.0  # hang guard
        while srv.stats.transitions < len(sent) and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        client.close()
        driver.close()
        srv.stop()
    assert res.steps == 12 and len(sent) >= 6  # at most 2 rows (2 x 98 KB) per 0.3 MB message
    assert all(len(P.encode(tr)) <= 300_000 for tr in sent)
    assert [tr.start_step for tr in sent] == list(np.cumsum([0] + [len(tr.actions) for tr in sent[:-1]]))
    assert sum(len(tr.actions) for tr in sent) == 12 and all(tr.obs["agentview_image"].dtype == np.uint8 for tr in sent)
    assert srv.stats.transitions == len(sent) and not srv.stats.errors
    assert observed and all(keys == {"state"} for keys in observed)  # the policy reads no image


def test_drive_and_teleop_configs_attach_cameras(tmp_path: Path, capsys) -> None:
    """`qc-robot drive ... cameras=[{...}]` runs a served episode with the camera in the driver's
    spec; teleop's build_driver attaches the same way."""
    from qc_robot.cli import main
    from qc_robot.server.app import ControlServer
    from qc_robot.server.serve import load_policy
    from qc_robot.teleop.config import TeleopConfig
    from qc_robot.teleop.session import build_driver

    video = _video(tmp_path / "v.avi", 10)
    cams = f"cameras=[{{name:front,source:'{video}',width:16,height:12,loop:true,max_age_s:1.0}}]"
    srv = ControlServer(load_policy("hold:28:5:5"), "tcp://127.0.0.1:*").start()
    try:
        rc = main(["drive", "driver=mock", f"server={srv.address}", "episodes=1", "driver_args.obs_dim=28",
                   "env.max_episode_steps=10", "jpeg_quality=90", cams])
    finally:
        srv.stop()
    out = capsys.readouterr().out
    assert rc == 0 and "success 0/1" in out, out
    d = build_driver(TeleopConfig(driver="mock", cameras=[{"name": "front", "source": video, "width": 16,
                                                           "height": 12}]))
    assert CameraConfig(source=0).source == "0"  # a YAML int is a device index
    assert ("front", (12, 16, 3), "uint8") in [(f.key, f.shape, f.dtype) for f in d.spec.obs_fields]
