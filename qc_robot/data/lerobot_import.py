"""``qc-robot dataset import FOLDER out=FILE``: a local LeRobotDataset → our robomimic HDF5.

What becomes what (LeRobot's name → ours):

* ``observation.state`` → ``obs/state``; any other ``observation.X`` vector → ``obs/X``;
  each camera ``observation.images.X`` (``video`` or ``image``) → ``obs/X``, uint8 (S, S, 3)
  decoded from the MP4s (or PNGs) at ``image_size`` S. ``next_obs`` is ``obs`` one frame on (the
  last frame repeats: a LeRobot episode stores no observation after its last action);
* ``action`` → ``actions``, scaled onto [-1, 1] per dimension (the agent's action range) from the
  dataset's own min/max when ``normalize``; the state dimensions named like action dimensions
  (a LeRobot arm's ``shoulder_pan.pos`` ...) get the same map. The ranges are kept in
  ``env_args['normalization']``, so ``dataset export`` and ``driver=lerobot``
  (``joint_low``/``joint_high``) undo it;
* ``next.reward`` → ``rewards`` (``reward_source`` 'recorded'); ``next.success`` → ``dones`` (true
  termination) and each episode's ``success``. Without rewards the file's rewards come from
  verdicts (``reward_source`` 'verdict', as for a robot's teleop recording): an episode with a
  ``next.success`` column is a success when one of its frames is, else it gets ``label``;
* episode boundaries → one ``data/demo_<i>`` per episode (attrs ``lerobot_episode_index``,
  ``task``); the per-frame ``task_index`` is kept beside the actions, the task strings in
  ``env_args['tasks']``; ``fps`` → ``env_args['control_hz']``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qc_robot.data.hdf5_io import DatasetError, EpisodeWriter
from qc_robot.data.lerobot_folder import BOOKKEEPING, LeRobotFolder, as_matrix, open_folder
from qc_robot.data.rewards import FROM_RECORDED, FROM_VERDICT, REWARD_SOURCE_KEY, VERDICTS
from qc_robot.data.video_frames import image_frame, video_frames

LEFT_OUT = ("next.done",)
"""Columns read on purpose for nothing: ``next.done`` marks an episode's last frame, whatever the
reason (LeRobot's gym recorder), which the episode boundary already says."""


def our_key(name: str) -> str:
    """'observation.images.front' → 'front', 'observation.state' → 'state'."""
    return name.removeprefix("observation.").removeprefix("images.")


@dataclass
class ImportSummary:
    episodes: int
    frames: int
    fps: float
    version: str
    obs_keys: list[str]
    cameras: list[str]
    reward_source: str
    successes: int
    left_out: list[str]
    normalization: dict[str, dict[str, list[float]]]

    def text(self, src: str, out: str) -> str:
        cams = f", cameras {', '.join(self.cameras)}" if self.cameras else ""
        lines = [f"imported {self.episodes} episodes ({self.frames} frames, {self.fps:g} Hz{cams}) from {src} "
                 f"(LeRobot {self.version}) -> {out}",
                 f"  observations {', '.join(self.obs_keys)}; rewards: {self.reward_source}; "
                 f"successes {self.successes}/{self.episodes}"]
        if self.left_out:
            lines.append(f"  left out: {', '.join(self.left_out)}")
        if "action" in self.normalization:
            n = self.normalization["action"]
            lines.append("  actions scaled onto [-1, 1] from low [" + " ".join(f"{x:.4g}" for x in n["low"])
                         + "] high [" + " ".join(f"{x:.4g}" for x in n["high"]) + "]")
        return "\n".join(lines)


def _ranges(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (low, high) of (T, D) values; a constant dimension gets ±1 around its value."""
    lo, hi = values.min(axis=0).astype(np.float64), values.max(axis=0).astype(np.float64)
    flat = hi - lo < 1e-6
    return np.where(flat, lo - 1.0, lo), np.where(flat, hi + 1.0, hi)


def _scale(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (2.0 * (x - lo) / (hi - lo) - 1.0).astype(np.float32)  # (T, D) onto [-1, 1]


def _normalization(folder: LeRobotFolder, actions: np.ndarray, vectors: dict[str, np.ndarray]
                   ) -> dict[str, dict[str, list[float]]]:
    """Per key, the raw (low, high) that map onto [-1, 1]: the actions' own range, and for each
    state dimension named like an action dimension that dimension's range (others: identity)."""
    lo, hi = _ranges(actions)
    out = {"action": {"low": lo.tolist(), "high": hi.tolist()}}
    names = list(folder.features["action"].get("names") or [])
    for name, v in vectors.items():
        vnames = list(folder.features[name].get("names") or [])
        shared = [(i, names.index(n)) for i, n in enumerate(vnames) if n in names and i < v.shape[1]]
        if not shared:
            continue
        vlo, vhi = -np.ones(v.shape[1]), np.ones(v.shape[1])
        for i, j in shared:
            vlo[i], vhi[i] = lo[j], hi[j]
        out[our_key(name)] = {"low": vlo.tolist(), "high": vhi.tolist()}
    return out


def _camera(folder: LeRobotFolder, name: str, rows: dict[str, Any], times: np.ndarray, sel: np.ndarray,
            ep_i: int, size: tuple[int, int] | None) -> np.ndarray:
    """One episode's frames of camera ``name``: (N, H, W, 3) uint8."""
    if folder.features[name]["dtype"] == "video":
        path, start = folder.episodes[ep_i].videos[name]
        return video_frames(path, start + times[sel], size, tolerance_s=0.5 / folder.fps)
    column = rows[name].take(sel)  # struct {bytes, path} per frame
    data = column.field("bytes").to_pylist()
    paths = column.field("path").to_pylist()
    return np.stack([image_frame(b if b is not None else (folder.root / str(p)).read_bytes(), size)
                     for b, p in zip(data, paths, strict=True)])


def import_folder(src: str | Path, out: str, image_size: int = 64, label: str = "success",
                  normalize: bool = True, progress: bool = False) -> ImportSummary:
    """Write every episode of the LeRobotDataset at ``src`` into ``out`` (our HDF5 layout,
    replaced atomically). ``image_size``: side of the square camera frames (0: as recorded);
    ``label``: the verdict of episodes the dataset says nothing about (no next.reward/next.success)."""
    from qc_robot.data.tools import _atomic_write

    if label not in VERDICTS:
        raise DatasetError(f"label must be one of {', '.join(VERDICTS)}, got {label!r}")
    if image_size < 0:
        raise DatasetError(f"image_size must be >= 0, got {image_size}")
    folder = open_folder(src)
    f = folder.features
    cams = folder.camera_keys()
    vec_names = [k for k in f if k.startswith("observation.") and k not in cams]
    left_out = sorted(k for k in f if k not in (*vec_names, *cams, "action", "next.reward", "next.success",
                                                   *BOOKKEEPING))
    for k in vec_names:
        if len(f[k].get("shape", ())) != 1 or f[k].get("dtype") not in ("float32", "float64", "int64", "int32"):
            raise DatasetError(f"{folder.root}: feature {k!r} ({f[k].get('dtype')}, shape {f[k].get('shape')}) "
                               "is neither a vector nor a camera")
    keys = [our_key(k) for k in (*vec_names, *cams)]
    if len(set(keys)) != len(keys):
        raise DatasetError(f"{folder.root}: features {vec_names + cams} give clashing keys {keys}")
    image_cols = [k for k in cams if f[k]["dtype"] == "image"]
    scalars = [k for k in ("next.reward", "next.success") if k in f]
    rows = folder.read_rows(["action", *vec_names, *scalars, *image_cols])
    n = len(rows["index"])
    actions = as_matrix(rows["action"], n, "action").astype(np.float64)
    vectors = {k: as_matrix(rows[k], n, k).astype(np.float64) for k in vec_names}
    norm = _normalization(folder, actions, vectors) if normalize else {}
    if norm:
        actions = _scale(actions, np.array(norm["action"]["low"]), np.array(norm["action"]["high"]))
        for k in vec_names:
            if our_key(k) in norm:
                vectors[k] = _scale(vectors[k], np.array(norm[our_key(k)]["low"]), np.array(norm[our_key(k)]["high"]))
    reward = as_matrix(rows["next.reward"], n, "next.reward")[:, 0] if "next.reward" in scalars else None
    success = as_matrix(rows["next.success"], n, "next.success")[:, 0].astype(bool) if "next.success" in scalars else None
    episode = as_matrix(rows["episode_index"], n, "episode_index")[:, 0]
    task_index = as_matrix(rows["task_index"], n, "task_index")[:, 0]
    times = as_matrix(rows["timestamp"], n, "timestamp")[:, 0].astype(np.float64)
    size = (image_size, image_size) if image_size else None
    source = FROM_RECORDED if reward is not None else FROM_VERDICT
    env_args: dict[str, Any] = {
        "driver": "lerobot", "source": "lerobot dataset import", "lerobot_root": str(folder.root.resolve()),
        "lerobot_version": folder.version, "robot_type": folder.robot_type, "control_hz": folder.fps,
        "act_dim": int(actions.shape[1]), "obs_keys": keys,
        "features": {our_key(k): k for k in (*vec_names, *cams)},
        "names": {our_key(k): list(f[k].get("names") or []) for k in ("action", *vec_names)},
        "tasks": [folder.tasks[i] for i in sorted(folder.tasks)], "normalization": norm,
        "image_size": image_size, REWARD_SOURCE_KEY: source}
    successes = 0

    def build(tmp: str) -> None:
        nonlocal successes
        with EpisodeWriter(tmp, env_args) as w:
            for ep_i, ep in enumerate(tqdm(folder.episodes, desc="import", unit="ep", disable=not progress)):
                sel = np.flatnonzero(episode == ep.index)
                if len(sel) != ep.length:
                    raise DatasetError(f"{folder.root}: episode {ep.index} has {len(sel)} frames in data/, "
                                       f"its metadata says {ep.length}")
                obs: dict[str, np.ndarray] = {our_key(k): vectors[k][sel].astype(np.float32) for k in vec_names}
                for k in cams:
                    obs[our_key(k)] = _camera(folder, k, rows, times, sel, ep_i, size)
                nxt = {k: np.concatenate([v[1:], v[-1:]]) for k, v in obs.items()}  # the last frame repeats
                ok = bool(success[sel].any()) if success is not None else label == "success"
                successes += ok
                dones = success[sel].astype(np.float32) if success is not None else np.zeros(len(sel), np.float32)
                rewards = reward[sel] if reward is not None else np.zeros(len(sel), np.float32)
                tasks = [folder.tasks.get(int(i), "") for i in dict.fromkeys(task_index[sel].tolist())]
                w.add_episode(obs, actions[sel], rewards, dones, nxt,
                              attrs={"label": "success" if ok else "failure", "success": ok,
                                     "task": " | ".join(tasks), "lerobot_episode_index": ep.index},
                              extras={"task_index": task_index[sel].astype(np.int64)})

    _atomic_write(os.fspath(out), build)
    return ImportSummary(len(folder.episodes), n, folder.fps, folder.version, keys, [our_key(k) for k in cams],
                         source, successes, left_out, norm)
