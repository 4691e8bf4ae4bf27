"""Camera frames out of a LeRobotDataset: MP4 (any codec FFmpeg decodes: AV1, H.264, ...) and
PNG/JPEG bytes, as uint8 RGB arrays at a chosen size, through PyAV (``qc-robot[lerobot-data]``).

PyAV's wheels carry their own FFmpeg (with the AV1 decoder LeRobot's videos need), so nothing is
needed from the system. Scaling happens in FFmpeg's swscale (area averaging), on each frame as it
is decoded: a long episode is never held at the camera's full resolution.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qc_robot.data.hdf5_io import DatasetError


def _rgb(frame: object, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 of a PyAV frame, scaled to ``size`` = (height, width) when given."""
    if size is None:
        return frame.to_ndarray(format="rgb24")  # type: ignore[attr-defined]
    h, w = size
    return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")  # type: ignore[attr-defined]


def video_frames(path: str | Path, times: Sequence[float], size: tuple[int, int] | None,
                 tolerance_s: float) -> np.ndarray:
    """The frames of the video at ``path`` shown at ``times`` (seconds from the file's start):
    (N, H, W, 3) uint8. Each time takes the nearest decoded frame; none within ``tolerance_s``
    raises DatasetError (a video shorter than its episode, or the wrong file)."""
    import av

    at_times = np.asarray(times, np.float64)
    if not len(at_times):
        return np.zeros((0, *(size or (0, 0)), 3), np.uint8)
    try:
        container = av.open(str(path))
    except (FileNotFoundError, av.error.FileNotFoundError):
        raise DatasetError(f"{path}: video file not found") from None
    except av.error.FFmpegError as e:
        raise DatasetError(f"{path}: not a readable video ({e})") from None
    with container:
        stream = container.streams.video[0]
        first, last = float(at_times.min()) - tolerance_s, float(at_times.max()) + tolerance_s
        if first > 0 and stream.time_base is not None:  # episodes after the first of a v3 file
            container.seek(int(first / stream.time_base), stream=stream)  # to the keyframe before
        stamps: list[float] = []
        frames: list[np.ndarray] = []
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else len(stamps) / float(stream.average_rate or 1)
            if t < first:
                continue
            if t > last:
                break
            stamps.append(t)
            frames.append(_rgb(frame, size))
    if not frames:
        raise DatasetError(f"{path}: no frames between {first:.3f} s and {last:.3f} s")
    at = np.asarray(stamps)
    nearest = np.abs(at[None, :] - at_times[:, None]).argmin(axis=1)  # (N,)
    off = np.abs(at[nearest] - at_times)
    if (off > tolerance_s).any():
        i = int(off.argmax())
        raise DatasetError(f"{path}: no frame within {tolerance_s * 1000:.0f} ms of {at_times[i]:.3f} s "
                           f"(nearest {at[nearest[i]]:.3f} s)")
    return np.stack([frames[i] for i in nearest])


def image_frame(data: bytes, size: tuple[int, int] | None) -> np.ndarray:
    """One encoded image (PNG or JPEG bytes, as LeRobot's ``image`` features store them) as
    (H, W, 3) uint8, scaled to ``size`` = (height, width) when given."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return _rgb(next(container.decode(video=0)), size)
    except (av.error.FFmpegError, StopIteration) as e:
        raise DatasetError(f"an image of the dataset cannot be decoded ({e})") from None
