"""Offscreen camera images of a MuJoCo (OGBench) task: uint8 (H, W, 3) RGB frames.

An image observation in qc-robot is ``key -> ndarray uint8 (H, W, 3)``, HWC RGB (docs/protocol.md).
:class:`SimCamera` renders one named camera of the task's model at a small resolution with
MuJoCo's own renderer, the same way OGBench renders ``ob_type='pixels'`` (``mujoco.Renderer`` on
the model, ``update_scene`` with the env's scene option, camera ``front_pixels``): with the
default quality a frame is pixel-identical to OGBench's visual-task observation.

Two facts shape the design:

- A GL context is bound to the thread that made it current (EGL refuses ``eglMakeCurrent`` from
  a second thread with ``EGL_BAD_ACCESS``), while the realtime sim steps on its own tick thread
  and resets on the caller's. Every GL call therefore runs on one worker thread owned by the
  camera; :meth:`SimCamera.render` hands it the job and waits.
- Software GL is slow here, and nearly all of it is OGBench's 4096² shadow map and 4× MSAA (the
  image size barely matters). ``fast=True`` renders with a 512² shadow map and no MSAA: several
  times cheaper, with softer shadow edges (benchmarks/bench_camera.py measures both, and how far apart
  their pixels are).

Offscreen GL needs ``MUJOCO_GL`` before mujoco is imported (EGL without a display):
:func:`qc_robot.video.use_offscreen_gl` is called on construction, mujoco is imported lazily.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import numpy as np

DEFAULT_CAMERA = "front_pixels"
"""OGBench's camera for pixel observations (its visual tasks); ``front`` is the video camera."""
FAST_SHADOW_SIZE = 512
RENDER_TIMEOUT_S = 60.0
"""A frame not rendered after this long is an error (a wedged GL driver), not a hang."""


class SimCamera:
    """One camera of an OGBench env, rendered offscreen on the camera's own GL thread.

    ``env`` is the unwrapped OGBench env (its ``_model``/``_data``/``_scene_option``). The model
    must be compiled (after the first ``reset``); a recompiled model gets a fresh renderer.
    """

    def __init__(self, env: Any, height: int, width: int, camera: str = DEFAULT_CAMERA,
                 fast: bool = False) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        from qc_robot.video import use_offscreen_gl

        use_offscreen_gl()
        self.env, self.height, self.width, self.camera, self.fast = env, int(height), int(width), camera, fast
        self._renderer: Any = None
        self._model: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sim-camera")
        self._lock = threading.Lock()
        self.frames = 0
        """Frames rendered so far."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def render(self) -> np.ndarray:
        """The current state as seen by the camera: a fresh uint8 (H, W, 3) array."""
        with self._lock:
            if self._pool is None:
                raise RuntimeError("camera closed")
            return self._pool.submit(self._render).result(RENDER_TIMEOUT_S)

    def close(self) -> None:
        """Free the GL context (on its own thread) and stop the worker. Idempotent."""
        with self._lock:
            if self._pool is None:
                return
            self._pool.submit(self._free).result(RENDER_TIMEOUT_S)
            self._pool.shutdown(wait=True)
            self._pool = None  # type: ignore[assignment]

    # -- on the GL thread -----------------------------------------------------------------------

    def _render(self) -> np.ndarray:
        model = self.env._model
        if model is None:
            raise RuntimeError("the env has no compiled model yet: reset it before rendering")
        if self._renderer is None or model is not self._model:
            self._free()
            self._renderer = self._make_renderer(model)
            self._model = model
        r = self._renderer
        r.update_scene(self.env._data, camera=self.camera, scene_option=getattr(self.env, "_scene_option", None))
        frame = np.asarray(r.render(), np.uint8)
        self.frames += 1
        return frame.copy()  # the renderer reuses its buffer

    def _make_renderer(self, model: Any) -> Any:
        import mujoco

        if self.camera and mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, self.camera) < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise ValueError(f"camera {self.camera!r} is not in the model (cameras: {names})")
        q = model.vis.quality
        saved = (int(q.shadowsize), int(q.offsamples))
        if self.fast:  # read once, when the context is made; restored so the env's own renders are unchanged
            q.shadowsize, q.offsamples = FAST_SHADOW_SIZE, 0
        try:
            return mujoco.Renderer(model, self.height, self.width)
        except ValueError as e:  # the model's offscreen buffer is smaller than the image
            raise ValueError(f"cannot render {self.height}x{self.width}: {e}") from None
        finally:
            q.shadowsize, q.offsamples = saved

    def _free(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            self._model = None
