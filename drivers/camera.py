"""Robot-side cameras: each captures on its own thread; the control loop takes the newest frame.

A camera never blocks the control loop. Its capture thread reads frames as the device delivers
them and keeps only the newest, stamped with ``time.monotonic()`` when it arrived; the loop's
:meth:`CameraStream.latest` only copies that frame under a lock. A frame older than the
camera's ``max_age_s`` (a slow, stalled or unplugged camera) or a capture that failed raises
:class:`~qc_robot.drivers.base.SensorError` instead of repeating the last picture: the safety
layer then holds the robot (``qc_robot.drivers.safety``). Reading resumes by itself when frames
come again; a source that ended or cannot be reopened stays an error.

Images follow the protocol's contract (docs/protocol.md section 12): ``uint8 (H, W, 3)`` RGB.

Backends: OpenCV (``cv2.VideoCapture``: USB/V4L2 devices by index or ``/dev/videoN``, and video
files or image sequences such as ``frames/%03d.png`` for replays and tests; the ``camera`` extra
installs ``opencv-python-headless``) and Intel RealSense (``pyrealsense2``, colour stream; not
tested here: no device). Both SDKs are imported when a camera opens, so importing this module
needs numpy only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qc_robot.drivers.base import SensorError

log = logging.getLogger("qc_robot.camera")
KINDS = ("opencv", "realsense")


@dataclass
class CameraConfig:
    """One camera: where its frames come from and the observation they become."""

    name: str = "image"
    """Observation key of its image (e.g. robomimic-style ``agentview_image``)."""
    kind: str = "opencv"
    """'opencv' (USB/V4L2, video files, image sequences) or 'realsense' (pyrealsense2)."""
    source: str = "0"
    """opencv: a device index ('0'), a device path ('/dev/video2'), a video file or an image
    sequence pattern ('frames/%03d.png'). realsense: the serial number ('' = the first device)."""
    width: int = 0
    """Image width delivered to the policy; frames of another size are resized (0: the source's)."""
    height: int = 0
    fps: float = 30.0
    """Rate asked of the device; files are read at this rate, like a live camera."""
    max_age_s: float = 0.2
    """A frame older than this is stale: an error, not a repeat (a few frame periods)."""
    open_timeout_s: float = 5.0
    """How long ``start`` waits for the first frame."""
    loop: bool = False
    """Files: start over at the end (replays); False: the end of the file is a failure."""

    def __post_init__(self) -> None:
        self.source = str(self.source)  # YAML reads `source: 0` as an int, a caller may pass a Path
        if self.kind not in KINDS:
            raise ValueError(f"camera {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.max_age_s <= 0 or self.fps <= 0:
            raise ValueError(f"camera {self.name!r}: max_age_s and fps must be > 0")
        if (self.width > 0) != (self.height > 0):
            raise ValueError(f"camera {self.name!r}: set both width and height, or neither")


@dataclass
class Frame:
    image: np.ndarray
    """uint8 (H, W, 3) RGB."""
    t: float
    """``time.monotonic()`` when the frame arrived from the device."""
    seq: int
    """Frames captured since the camera started (1 = the first)."""


class CameraStream:
    """A capture thread over a backend's blocking ``_open``/``_read``/``_release``.

    ``latest()`` never waits for the device. Subclasses implement the three hooks; ``_read``
    returns one RGB or BGR frame (``_bgr`` says which) or None when the source has ended.
    """

    _bgr = False

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._error: str | None = None
        self._running = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames = 0
        """Frames captured so far."""
        self.read_errors = 0
        """Reads that raised (each logged once per 100)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of delivered frames; known from the config or, without one, after ``start``."""
        if self.cfg.width > 0:
            return (self.cfg.height, self.cfg.width, 3)
        with self._lock:
            if self._frame is None:
                raise RuntimeError(f"camera {self.cfg.name!r}: size unknown before the first frame "
                                   f"(set width and height)")
            return tuple(self._frame.image.shape)  # type: ignore[return-value]

    def start(self) -> None:
        """Open the device and start capturing; waits up to ``open_timeout_s`` for the first
        frame. Raises SensorError if the device cannot be opened or sends nothing. Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._error, self._frame = None, None
        self._first.clear()
        self._running.set()
        self._thread = threading.Thread(target=self._capture, name=f"camera-{self.cfg.name}", daemon=True)
        self._thread.start()
        if not self._first.wait(self.cfg.open_timeout_s):
            self.stop()
            raise SensorError(f"camera {self.cfg.name!r}: no frame within {self.cfg.open_timeout_s} s "
                              f"from {self.cfg.source!r}")
        with self._lock:
            if self._frame is None:
                err = self._error
                self.stop()
                raise SensorError(f"camera {self.cfg.name!r}: {err}")

    def stop(self) -> None:
        """Stop capturing and release the device (waits at most 2 s for a blocked read). Idempotent."""
        self._running.clear()
        if self._thread is not None:
            self._thread.join(2.0)
            if self._thread.is_alive():
                log.warning("camera %r: capture thread still blocked in the device read", self.cfg.name)
            self._thread = None

    def latest(self, now: float | None = None) -> Frame:
        """The newest frame, if fresh; SensorError when the camera failed or it is stale."""
        now = time.monotonic() if now is None else now
        with self._lock:
            frame, err = self._frame, self._error
        if err is not None:
            raise SensorError(f"camera {self.cfg.name!r} failed: {err}")
        if frame is None:
            raise SensorError(f"camera {self.cfg.name!r}: no frame yet (not started?)")
        age = now - frame.t
        if age > self.cfg.max_age_s:
            raise SensorError(f"camera {self.cfg.name!r}: newest frame is {age * 1e3:.0f} ms old "
                              f"(max_age_s {self.cfg.max_age_s})")
        return frame

    # -- capture thread -------------------------------------------------------------------------

    def _capture(self) -> None:
        try:
            self._open()
        except Exception as e:  # noqa: BLE001 - any SDK failure is this camera's error
            self._fail(f"cannot open {self.cfg.source!r}: {e}")
            return
        period = 1.0 / self.cfg.fps
        next_t = time.monotonic()
        try:
            while self._running.is_set():
                try:
                    raw = self._read()
                except Exception as e:  # noqa: BLE001 - one bad read is one frame's error
                    self.read_errors += 1
                    if self.read_errors % 100 == 1:
                        log.warning("camera %r: read failed (%d so far): %s", self.cfg.name, self.read_errors, e)
                    time.sleep(period)
                    continue
                if raw is None:
                    self._fail(f"source {self.cfg.source!r} ended or the device was lost")
                    return
                self._publish(raw)
                if self._paced:  # files and sequences deliver instantly: read them at the camera rate
                    next_t += period
                    time.sleep(max(0.0, next_t - time.monotonic()))
        finally:
            try:
                self._release()
            except Exception as e:  # noqa: BLE001
                log.warning("camera %r: release failed: %s", self.cfg.name, e)

    def _publish(self, raw: np.ndarray) -> None:
        t = time.monotonic()
        img = np.asarray(raw)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            self.read_errors += 1
            return
        img = img[:, :, :3]
        if self._bgr:
            img = img[:, :, ::-1]
        if self.cfg.width > 0 and img.shape[:2] != (self.cfg.height, self.cfg.width):
            img = self._resize(img)
        frame = Frame(np.ascontiguousarray(img, dtype=np.uint8), t, self.frames + 1)
        with self._lock:
            self._frame = frame
            self.frames += 1
        self._first.set()

    def _fail(self, why: str) -> None:
        log.error("camera %r: %s", self.cfg.name, why)
        with self._lock:
            self._error = why
        self._first.set()

    def _resize(self, img: np.ndarray) -> np.ndarray:
        import cv2  # both backends' installs bring it (opencv-python-headless)

        return cv2.resize(img, (self.cfg.width, self.cfg.height), interpolation=cv2.INTER_AREA)

    # -- backend hooks --------------------------------------------------------------------------
    _paced = False

    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> np.ndarray | None:
        raise NotImplementedError

    def _release(self) -> None:
        pass


class OpenCVCamera(CameraStream):
    """``cv2.VideoCapture``: a USB/V4L2 device (index or path), a video file, an image sequence."""

    _bgr = True  # OpenCV decodes to BGR

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        self._cap: Any = None
        src = cfg.source
        self._device = src.isdigit() or src.startswith("/dev/video")
        self._paced = not self._device

    def _open(self) -> None:
        try:
            import cv2
        except ImportError:
            raise RuntimeError("OpenCV is not installed: pip install 'qc-robot[camera]'") from None
        src: int | str = int(self.cfg.source) if self.cfg.source.isdigit() else self.cfg.source
        cap = cv2.VideoCapture(src, cv2.CAP_V4L2) if self._device else cv2.VideoCapture(src)
        if not cap.isOpened():
            raise RuntimeError("cv2.VideoCapture could not open it")
        if self._device:  # ask the device for the size/rate; what it delivers is resized anyway
            if self.cfg.width > 0:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
            cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
        self._cap = cap

    def _read(self) -> np.ndarray | None:
        ok, frame = self._cap.read()
        if not ok and self.cfg.loop and not self._device:
            import cv2

            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._cap.read()
        return frame if ok else None

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class RealSenseCamera(CameraStream):
    """The colour stream of an Intel RealSense camera (``pyrealsense2``). Untested here (no device)."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        self._pipe: Any = None

    def _open(self) -> None:
        try:
            import pyrealsense2 as rs
        except ImportError:
            raise RuntimeError("pyrealsense2 is not installed: pip install pyrealsense2") from None
        config = rs.config()
        if self.cfg.source not in ("", "0"):  # a serial number picks the device
            config.enable_device(self.cfg.source)
        w, h = (self.cfg.width, self.cfg.height) if self.cfg.width > 0 else (640, 480)
        config.enable_stream(rs.stream.color, w, h, rs.format.rgb8, int(self.cfg.fps))
        self._pipe = rs.pipeline()
        self._pipe.start(config)

    def _read(self) -> np.ndarray | None:
        frames = self._pipe.wait_for_frames(int(max(1.0, 5 * self.cfg.max_age_s) * 1000))  # raises on timeout
        color = frames.get_color_frame()
        if not color:
            raise RuntimeError("frame set without a colour frame")
        return np.asanyarray(color.get_data())

    def _release(self) -> None:
        if self._pipe is not None:
            self._pipe.stop()
            self._pipe = None


def make_camera(cfg: CameraConfig) -> CameraStream:
    """The camera stream for ``cfg`` (not started)."""
    return OpenCVCamera(cfg) if cfg.kind == "opencv" else RealSenseCamera(cfg)
