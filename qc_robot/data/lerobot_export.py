"""``qc-robot dataset export FILE out=FOLDER``: our HDF5 → a LeRobotDataset folder, written by
LeRobot's own ``LeRobotDataset`` writer (0.3.x writes its v2.1 layout, 0.4.x v3.0), so LeRobot's
loader, its training scripts and its visualiser open it.

The inverse of ``qc_robot.data.lerobot_import``: each key goes back under the LeRobot name it was
imported from (else ``state`` → ``observation.state``, a camera X → ``observation.images.X``, any
other vector X → ``observation.X``), scaled actions and states go back to their recorded units,
each demo becomes one episode with its ``task`` (else the file's sim task), ``rewards`` become
``next.reward`` when the file recorded them, and a true termination (a success: the sim's, or an
operator's verdict) becomes ``next.success``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from qc_robot.data.hdf5_io import DatasetError, load_flat
from qc_robot.data.rewards import FROM_RECORDED

DEFAULT_TASK = "qc-robot episode"


@dataclass
class ExportSummary:
    episodes: int
    frames: int
    fps: int
    features: list[str]
    version: str

    def text(self, src: str, out: str) -> str:
        return (f"exported {self.episodes} episodes ({self.frames} frames, {self.fps} Hz) from {src} -> {out} "
                f"(LeRobotDataset {self.version}: {', '.join(self.features)})")


def lerobot_dataset_class() -> Any:
    """LeRobot's ``LeRobotDataset``; DatasetError (one line) when it cannot be imported."""
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise DatasetError(
            f"export writes with LeRobot's own LeRobotDataset writer, which cannot be imported here "
            f"({type(e).__name__}: {' '.join(str(e).split())}); install LeRobot with its dataset "
            "dependencies (docs/lerobot.md)") from None
    return LeRobotDataset


def lerobot_name(key: str, env_args: dict[str, Any], image: bool) -> str:
    """The LeRobot feature a key of ours is written as."""
    known = env_args.get("features") or {}
    if key in known:
        return str(known[key])
    if image:
        return f"observation.images.{key}"
    return "observation.state" if key == "state" else f"observation.{key}"


def _unscale(x: np.ndarray, key: str, env_args: dict[str, Any]) -> np.ndarray:
    """Undo the import's [-1, 1] scaling of ``key`` (identity when the file has none)."""
    n = (env_args.get("normalization") or {}).get(key)
    if not n:
        return x.astype(np.float32)
    lo, hi = np.asarray(n["low"], np.float64), np.asarray(n["high"], np.float64)
    return (lo + (x.astype(np.float64) + 1.0) * 0.5 * (hi - lo)).astype(np.float32)  # (T, D)


def export_file(path: str, out: str, video: bool = True, repo_id: str = "", fps: float = 0.0,
                progress: bool = False) -> ExportSummary:
    """Write every complete demo of ``path`` as one episode of a new LeRobotDataset at ``out``."""
    if os.path.exists(out):
        raise DatasetError(f"{out}: already exists; export creates a new LeRobotDataset folder")
    data = load_flat(path, need_rewards=False)
    env = data.env_args
    rate = float(fps or env.get("control_hz") or 0)
    if rate <= 0:
        raise DatasetError(f"{path}: env_args has no control_hz; give the rate: fps=...")
    if abs(rate - round(rate)) > 1e-6:
        raise DatasetError(f"{path}: LeRobot needs a whole number of frames per second, the file has {rate:g}; "
                           "give fps=...")
    with h5py.File(path, "r") as f:
        tasks = [str(f["data"][n].attrs.get("task", "")) for n in data.demo_names]
    default_task = str(env.get("task") or DEFAULT_TASK)
    names = env.get("names") or {}
    vec = data.vector_keys
    widths = [int(np.prod(data.obs_shapes[k])) for k in vec]
    columns = np.split(data.observations, np.cumsum(widths)[:-1], axis=1) if vec else []
    state = {k: _unscale(c, k, env) for k, c in zip(vec, columns, strict=True)}
    actions = _unscale(data.actions, "action", env)

    def named(key: str, width: int) -> list[str] | None:
        given = list(names.get(key) or [])
        return given if len(given) == width else None

    features: dict[str, dict[str, Any]] = {
        lerobot_name(k, env, False): {"dtype": "float32", "shape": (w,), "names": named(k, w)}
        for k, w in zip(vec, widths, strict=True)}
    for k, v in data.images.items():
        features[lerobot_name(k, env, True)] = {"dtype": "video" if video else "image", "shape": tuple(v.shape[1:]),
                                                "names": ["height", "width", "channels"]}
    features["action"] = {"dtype": "float32", "shape": (actions.shape[1],),
                          "names": named("action", actions.shape[1])}
    recorded = data.reward_source == FROM_RECORDED
    if recorded:
        features["next.reward"] = {"dtype": "float32", "shape": (1,), "names": None}
    features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}

    cls = lerobot_dataset_class()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    ds = cls.create(repo_id or f"local/{Path(out).name}", fps=int(round(rate)), features=features, root=out,
                    robot_type=str(env.get("robot_type") or env.get("driver") or "qc-robot"), use_videos=video)
    task_arg = "task" in inspect.signature(ds.add_frame).parameters  # 0.3.x: add_frame(frame, task)
    success = data.masks < 0.5  # a true termination
    starts = np.concatenate([[0], data.episode_ends[:-1]])
    for i, (a, b) in enumerate(tqdm(list(zip(starts, data.episode_ends, strict=True)), desc="export",
                                    unit="ep", disable=not progress)):
        task = tasks[i] or default_task
        for t in range(int(a), int(b)):
            frame: dict[str, Any] = {lerobot_name(k, env, False): state[k][t] for k in vec}
            frame.update({lerobot_name(k, env, True): v[t] for k, v in data.images.items()})
            frame["action"] = actions[t]
            if recorded:
                frame["next.reward"] = np.array([data.rewards[t]], np.float32)
            frame["next.success"] = np.array([success[t]])
            if task_arg:
                ds.add_frame(frame, task=task)
            else:
                ds.add_frame({**frame, "task": task})
        ds.save_episode()
    if hasattr(ds, "finalize"):  # 0.4.x: closes the parquet writers (the last file is unreadable until then)
        ds.finalize()
    return ExportSummary(len(data.episode_ends), len(data), int(round(rate)), list(features),
                         str(ds.meta.info.get("codebase_version", "?")))
