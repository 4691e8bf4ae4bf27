"""Rollout videos: MuJoCo offscreen frames of a sim episode, written as GIF or MP4.

``qc-robot eval video=out.gif`` and ``qc-robot drive driver=sim realtime=false video=out.mp4``
record episodes so a user can see what a policy does. Frames come from the task's own MuJoCo
renderer (OGBench's ``front`` camera) on an offscreen GL context: EGL when there is no display
(set before mujoco is imported; ``MUJOCO_GL`` set by the user wins). Rendering is slow on a CPU
(35-300 ms a frame here with EGL's software path), so recording is opt-in, ``every`` keeps one
frame in N, and ``max_frames`` bounds a file.

GIF needs only Pillow (a matplotlib dependency, in the ``learn`` extra); MP4 needs imageio with
its ffmpeg plugin (``pip install "qc-robot[video]"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = (".gif", ".mp4")


def use_offscreen_gl() -> None:
    """Pick an offscreen GL backend for MuJoCo before it is imported (no window is ever opened)."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def check_video_path(path: str) -> None:
    """ValueError unless ``path`` ends in a format we write (checked before a run starts)."""
    if Path(path).suffix.lower() not in FORMATS:
        raise ValueError(f"video: {path!r} must end in .gif or .mp4")
    if Path(path).suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ModuleNotFoundError:
            raise ModuleNotFoundError("MP4 needs imageio-ffmpeg", name="imageio_ffmpeg") from None


def render_frame(env: Any) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8 of a task env (``qc_robot.sim.tasks.TaskEnv`` or a gymnasium env)."""
    base = getattr(env, "unwrapped", env)
    return np.asarray(base.render(), np.uint8)


class VideoWriter:
    """Collects frames, writes them on :meth:`close` (GIF) or as they come (MP4).

    ``every``: keep one frame in ``every`` (the control rate is 20 Hz; every=2 gives 10 fps of
    real time at ``fps`` = 10). ``max_frames``: frames beyond it are dropped (a bound on time
    spent rendering and on file size).
    """

    def __init__(self, path: str, fps: float = 10.0, every: int = 2, max_frames: int = 600) -> None:
        check_video_path(path)
        self.path = Path(path)
        self.fps, self.every, self.max_frames = fps, max(1, every), max_frames
        self.frames: list[np.ndarray] = []
        self.written = 0
        self._tick = 0

    def wants_frame(self) -> bool:
        """Whether the next :meth:`tick` keeps a frame (so callers render only then)."""
        return self._tick % self.every == 0 and self.written + len(self.frames) < self.max_frames

    def tick(self, render: Any) -> None:
        """Advance one control step; ``render()`` is called only when this step's frame is kept."""
        if self.wants_frame():
            self.frames.append(np.asarray(render(), np.uint8))
        self._tick += 1

    def add_separator(self, n: int = 3) -> None:
        """A few black frames between episodes, so episode boundaries are visible."""
        if self.frames:
            self.frames += [np.zeros_like(self.frames[-1])] * n

    def close(self) -> Path | None:
        """Write the file; None when no frame was recorded."""
        if not self.frames:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix.lower() == ".gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in self.frames]
            images[0].save(self.path, save_all=True, append_images=images[1:], loop=0,
                           duration=int(round(1000 / self.fps)))
        else:
            import imageio.v2 as imageio

            with imageio.get_writer(self.path, fps=self.fps, macro_block_size=8) as w:
                for f in self.frames:
                    w.append_data(f)  # type: ignore[attr-defined]
        self.written += len(self.frames)
        self.frames = []
        return self.path


class DriverVideo:
    """Frames of a sim driver's first ``episodes`` episodes, one per executed step (``run_episode``'s
    ``on_rows``), rendered from the driver's own simulator after the step."""

    def __init__(self, path: str, driver: Any, episodes: int = 1, every: int = 2) -> None:
        env = getattr(driver, "env", None)
        if env is None and not hasattr(driver, "connect"):
            raise ValueError("video: only the sim driver can be recorded")
        self.driver, self.episodes = driver, episodes
        self.writer = VideoWriter(path, every=every)

    def episode(self, i: int) -> Any:
        """The ``on_rows`` callback for episode ``i`` (None once enough episodes are recorded)."""
        if i >= self.episodes:
            return None
        self.writer.add_separator()
        env = self.driver.env
        if env is None:
            raise ValueError("video: this driver has no simulator to render (use driver=sim)")
        self.writer.tick(lambda: render_frame(env))  # the reset state

        def on_rows(rows: list[Any]) -> None:
            for _ in rows:
                self.writer.tick(lambda: render_frame(env))

        return on_rows

    def close(self) -> Path | None:
        return self.writer.close()


def save_png(frame: np.ndarray, path: str) -> Path:
    """One frame as a PNG (the README shows one)."""
    from PIL import Image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame, np.uint8)).save(p)
    return p
