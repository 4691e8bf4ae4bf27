"""Labelled frames for the success detector: episodes from HDF5 files, per-frame labels, a split.

A *frame* is one observation the robot saw: an episode of N steps has N + 1 of them, ``obs`` of
each step and the final ``next_obs`` (for a success ended by the env or the operator, that last
one is the success state). That is what the detector sees on the robot, one ``update`` per
observation from the reset on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from qc_robot.data.hdf5_io import DatasetError, load_flat, vector_obs_keys
from qc_robot.policies.base import ObsField

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


@dataclass
class LabelledFrames:
    """Every frame of every labelled episode, in episode order."""

    state: np.ndarray
    """(F, O) float32: the vector keys flattened and concatenated in ``obs_fields`` order."""
    images: dict[str, np.ndarray]
    """key → (F, H, W, C) uint8."""
    labels: np.ndarray
    """(F,) int8: POSITIVE, NEGATIVE or IGNORED (the gap before a success's positives)."""
    episode: np.ndarray
    """(F,) int64: the episode each frame belongs to."""
    success: np.ndarray
    """(E,) bool: each episode's label."""
    names: list[str]
    """(E,) 'file:demo_i'."""
    obs_fields: list[ObsField]
    task: str = ""
    control_hz: float = 0.0
    skipped: list[str] = field(default_factory=list)
    """Demos without a success/failure label (not used)."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_episodes(self) -> int:
        return len(self.success)

    def rows(self, episodes: np.ndarray) -> np.ndarray:
        """Frame indices of ``episodes`` (in frame order)."""
        return np.flatnonzero(np.isin(self.episode, episodes))


def episode_label(attrs: h5py.AttributeManager) -> bool | None:
    """True/False from a demo's 'label' ('success'/'failure', as Recorder.finish writes it) or
    its 'success' attr; None when the episode has no verdict ('unlabelled', recovered)."""
    label = attrs.get("label")
    if isinstance(label, bytes):
        label = label.decode()
    if label in ("success", "failure"):
        return label == "success"
    if label is None and "success" in attrs:
        return bool(attrs["success"])
    return None


def frame_labels(n_frames: int, success: bool, positive_frames: int, gap_frames: int) -> np.ndarray:
    """(n_frames,) labels of one episode: a success's last ``positive_frames`` frames positive,
    the ``gap_frames`` before them ignored, everything else (all of a failure) negative."""
    out = np.full(n_frames, NEGATIVE, np.int8)
    if success:
        p = min(positive_frames, n_frames)
        out[n_frames - p:] = POSITIVE
        out[max(n_frames - p - gap_frames, 0):n_frames - p] = IGNORED
    return out


def load_labelled(paths: Sequence[str], obs_keys: list[str] | None, positive_frames: int,
                  gap_frames: int) -> LabelledFrames:
    """Load the labelled episodes of ``paths``; DatasetError (one line) for unusable input."""
    if not paths:
        raise DatasetError("no episode files given (qc-robot reward FILE.hdf5 ...)")
    if positive_frames < 1 or gap_frames < 0:
        raise ValueError(f"positive_frames must be >= 1 and gap_frames >= 0, got {positive_frames}, {gap_frames}")
    keys = list(obs_keys) if obs_keys else None
    if keys is None:
        keys, images = vector_obs_keys(paths[0])
        if images:
            print(f"note: image keys {images} left out (name them in obs_keys to train on camera images)")
    task, hz = "", 0.0
    state: list[np.ndarray] = []
    imgs: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    episode: list[np.ndarray] = []
    success: list[bool] = []
    names: list[str] = []
    skipped: list[str] = []
    fields: list[ObsField] | None = None
    for path in paths:
        ds = load_flat(path, obs_keys=keys)
        these = [ObsField(k, tuple(ds.obs_shapes[k]), "uint8" if k in ds.images else "float32") for k in keys]
        if fields is None:
            fields = these
            task, hz = str(ds.env_args.get("task", "")), float(ds.env_args.get("control_hz", 0.0) or 0.0)
        elif these != fields:
            raise DatasetError(f"{path}: observations {these} differ from {paths[0]}'s {fields}")
        elif str(ds.env_args.get("task", "")) != task:
            raise DatasetError(f"{path}: task {ds.env_args.get('task')!r} differs from {paths[0]}'s {task!r}")
        with h5py.File(path, "r") as f:
            verdicts = [episode_label(f["data"][n].attrs) for n in ds.demo_names]
        starts = np.concatenate([[0], ds.episode_ends[:-1]])
        for name, s, e, ok in zip(ds.demo_names, starts, ds.episode_ends, verdicts, strict=True):
            if ok is None:
                skipped.append(f"{os.path.basename(path)}:{name}")
                continue
            state.append(np.concatenate([ds.observations[s:e], ds.next_observations[e - 1:e]]))  # (N+1, O)
            imgs.append({k: np.concatenate([ds.images[k][s:e], ds.next_images[k][e - 1:e]]) for k in ds.images})
            labels.append(frame_labels(e - s + 1, ok, positive_frames, gap_frames))
            episode.append(np.full(e - s + 1, len(success), np.int64))
            success.append(ok)
            names.append(f"{os.path.basename(path)}:{name}")
    if skipped:
        print(f"note: {len(skipped)} demo(s) without a success/failure label skipped: {skipped[:5]}")
    if not success:
        raise DatasetError(f"{paths[0]}: no episode carries a 'label' of 'success' or 'failure'")
    assert fields is not None
    image_keys = [f.key for f in fields if f.dtype == "uint8"]
    return LabelledFrames(
        state=np.concatenate(state).astype(np.float32),
        images={k: np.concatenate([d[k] for d in imgs]) for k in image_keys},
        labels=np.concatenate(labels),
        episode=np.concatenate(episode),
        success=np.asarray(success, bool),
        names=names,
        obs_fields=fields,
        task=task,
        control_hz=hz,
        skipped=skipped,
    )


def split_episodes(frames: LabelledFrames, valid_fraction: float, seed: int,
                   valid_names: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train episodes, held-out episodes): ``valid_names`` ('file:demo_i') if given, else a
    random ``valid_fraction`` of the successes and of the failures separately (at least one of
    each class held out when it has two or more episodes, and one kept for training)."""
    ids = np.arange(frames.num_episodes)
    if valid_names is not None:
        held = np.array([n in valid_names for n in frames.names])
        train, valid = ids[~held], ids[held]
    else:
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
        rng = np.random.default_rng(seed)
        valid_parts = []
        for cls in (True, False):
            members = rng.permutation(ids[frames.success == cls])
            k = int(round(valid_fraction * len(members)))
            if len(members) >= 2:
                k = min(max(k, 1), len(members) - 1)
            else:
                k = 0
            valid_parts.append(members[:k])
        valid = np.sort(np.concatenate(valid_parts))
        train = np.setdiff1d(ids, valid)
    if not frames.success[train].any():
        raise DatasetError("no success episode left to train on: record more successes "
                           f"({int(frames.success.sum())} of {frames.num_episodes} episodes are)")
    if len(valid) == 0:
        raise DatasetError(f"no held-out episodes ({frames.num_episodes} labelled episodes): record more, "
                           "or name them with valid_filter")
    return train, valid


def read_filter(paths: Sequence[str], name: str) -> set[str]:
    """'file:demo_i' names listed in ``mask/<name>`` of the files (DatasetError if none has it)."""
    out: set[str] = set()
    found = False
    for path in paths:
        with h5py.File(path, "r") as f:
            mask = f.get(f"mask/{name}")
            if mask is None:
                continue
            found = True
            out |= {f"{os.path.basename(path)}:{x.decode() if isinstance(x, bytes) else x}" for x in mask[()]}
    if not found:
        raise DatasetError(f"valid_filter={name}: no file has mask/{name} (qc-robot dataset split writes it)")
    return out
