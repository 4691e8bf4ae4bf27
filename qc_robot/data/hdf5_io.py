"""Episode files in the robomimic HDF5 layout: one reader and one writer for sim and robot data.

Layout (plain h5py can read it; robomimic files load too)::

    data                       attrs: total (transitions), env_args (JSON string),
                                      format='qc-robot-hdf5', format_version=1
    data/demo_<i>              attrs: num_samples (written last: marks the episode complete)
        actions (N, A) float32, rewards (N,), dones (N,)  (dones = true termination)
        obs/<key> (N, ...), next_obs/<key> (N, ...)   (sim data: 'state', and camera images)
                               images: uint8 (N, H, W, 3) RGB, one chunk per frame, gzip
        <extra> (N, ...)        optional per-step arrays, e.g. robomimic's 'states'
    mask/<filter>              optional lists of demo names (e.g. train / valid)

The writer completes and flushes one whole episode at a time, then bumps ``total``. A demo group
without ``num_samples`` is an episode whose write never finished: readers skip it. A kill in the
middle of an HDF5 write can still damage the file's structure; crash-safe recording
(``qc_robot.data.recorder``) therefore journals steps elsewhere and commits episodes atomically.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from qc_robot.data.rewards import (
    FROM_RECORDED,
    FROM_VERDICT,
    reward_source,
    sparsify,
    verdict_rewards,
)

FORMAT = "qc-robot-hdf5"
FORMAT_VERSION = 1
_DEMO_RE = re.compile(r"^demo_(\d+)$")
_RESERVED = {"actions", "rewards", "dones", "obs", "next_obs"}


class DatasetError(ValueError):
    """A dataset file is missing, malformed or holds bad values; the message names file and key."""


# -- writing -------------------------------------------------------------------------------------
class EpisodeWriter:
    """Append whole episodes to an HDF5 file; use as a context manager.

    ``mode='w'`` creates (truncates) the file, ``mode='a'`` appends to an existing file of ours
    (numbering continues after its highest demo; ``env_args`` must match).
    """

    def __init__(
        self, path: str | os.PathLike[str], env_args: Mapping[str, Any], mode: str = "w"
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        self.path = os.fspath(path)
        self.env_args = dict(env_args)
        env_json = json.dumps(self.env_args, sort_keys=True)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        appending = mode == "a" and os.path.exists(self.path)
        self._file = h5py.File(self.path, "a" if appending else "w")
        if appending:
            data = self._file.get("data")
            if not isinstance(data, h5py.Group) or data.attrs.get("format") != FORMAT:
                self._file.close()
                raise DatasetError(f"{self.path}: cannot append, not a {FORMAT} file")
            if json.loads(str(data.attrs["env_args"])) != json.loads(env_json):
                self._file.close()
                raise DatasetError(
                    f"{self.path}: data.attrs['env_args'] differs from the writer's env_args"
                )
            self._data = data
            self._next = 1 + max((int(m[1]) for k in data if (m := _DEMO_RE.match(k))), default=-1)
        else:
            self._data = self._file.create_group("data")
            self._data.attrs["total"] = 0
            self._data.attrs["env_args"] = env_json
            self._data.attrs["format"] = FORMAT
            self._data.attrs["format_version"] = FORMAT_VERSION
            self._next = 0
        self._file.flush()

    def add_episode(
        self,
        obs: Mapping[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        next_obs: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any] | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Write one complete episode of N steps and flush; returns its demo name.

        ``obs``/``next_obs`` map keys to (N, ...) arrays; ``dones`` is the true-termination flag.
        ``extras`` are further (N, ...) arrays stored beside ``actions`` (e.g. MuJoCo ``states``).
        """
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"actions must be (N, A) with N > 0, got shape {actions.shape}")
        n = len(actions)
        arrays: dict[str, np.ndarray] = {
            "actions": actions,
            "rewards": np.asarray(rewards, dtype=np.float32),
            "dones": np.asarray(dones, dtype=np.float32),
        }
        for k in ("rewards", "dones"):
            if arrays[k].shape != (n,):
                raise ValueError(f"{k} must have shape ({n},), got {arrays[k].shape}")
        if set(obs) != set(next_obs) or not obs:
            raise ValueError(
                f"obs and next_obs need the same non-empty keys, got {sorted(obs)} / {sorted(next_obs)}"
            )
        for group, d in (("obs", obs), ("next_obs", next_obs)):
            for k, v in d.items():
                v = np.asarray(v)
                if len(v) != n or v.shape != np.shape(obs[k]):
                    raise ValueError(
                        f"{group}/{k} has shape {v.shape}, expected ({n}, ...) matching obs/{k}"
                    )
                arrays[f"{group}/{k}"] = v
        for k, v in (extras or {}).items():
            if k in _RESERVED or "/" in k:
                raise ValueError(f"extra key {k!r} is reserved or nested")
            v = np.asarray(v)
            if len(v) != n:
                raise ValueError(f"extra {k!r} has {len(v)} rows, expected {n}")
            arrays[k] = v

        name = f"demo_{self._next}"
        grp = self._data.create_group(name)
        for k, v in arrays.items():
            grp.create_dataset(k, data=v, **_storage(v))
        for k, v in (attrs or {}).items():
            grp.attrs[k] = v
        grp.attrs["num_samples"] = n  # last: the episode is complete
        self._data.attrs["total"] = int(self._data.attrs["total"]) + n
        self._file.flush()
        self._next += 1
        return name

    def set_filter(self, name: str, demos: Sequence[str]) -> None:
        """Write ``mask/<name>``: a list of demo names (robomimic filter keys, e.g. train/valid)."""
        mask = self._file.require_group("mask")
        if name in mask:
            del mask[name]
        mask.create_dataset(name, data=np.array([d.encode() for d in demos], dtype="S"))
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


IMAGE_COMPRESSION = "gzip"
IMAGE_COMPRESSION_LEVEL = 4
"""Images are stored compressed (gzip: readable by any HDF5 build, unlike lzf)."""


def is_image(v: np.ndarray) -> bool:
    """A per-step image array: uint8 (N, H, W) or (N, H, W, C)."""
    return v.dtype == np.uint8 and v.ndim in (3, 4)


def _storage(v: np.ndarray) -> dict[str, Any]:
    """Dataset options: images chunked one frame per chunk (a reader of one step decompresses
    one frame) and compressed; everything else contiguous as before."""
    if not is_image(v):
        return {}
    return dict(chunks=(1, *v.shape[1:]), compression=IMAGE_COMPRESSION,
                compression_opts=IMAGE_COMPRESSION_LEVEL, shuffle=False)


# -- reading -------------------------------------------------------------------------------------
@dataclass
class FlatDataset:
    """All demos concatenated in demo order, as the replay wants them (float32 arrays)."""

    observations: np.ndarray  # (T, O)
    actions: np.ndarray  # (T, A)
    rewards: np.ndarray  # (T,)
    terminals: np.ndarray  # (T,) 1 at each demo's last row (episode ended)
    masks: np.ndarray  # (T,) 1 - dones (0: true termination, stop bootstrapping)
    next_observations: np.ndarray  # (T, O)
    obs_keys: list[str]
    obs_shapes: dict[str, tuple[int, ...]]
    env_args: dict[str, Any]
    episode_ends: np.ndarray  # (E,) int64 exclusive end row of each demo
    demo_names: list[str] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    """Image keys (uint8 (H, W, C) steps), kept as (T, H, W, C) uint8, not flattened into
    ``observations``; in ``obs_keys`` order."""
    next_images: dict[str, np.ndarray] = field(default_factory=dict)
    reward_source: str = FROM_RECORDED
    """Where ``rewards`` came from: 'recorded' (the env's) or 'verdict' (each demo's label, in the
    sparse convention: ``qc_robot.data.rewards``)."""

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def vector_keys(self) -> list[str]:
        """The keys concatenated into ``observations`` (``obs_keys`` without the images)."""
        return [k for k in self.obs_keys if k not in self.images]

    def as_replay_dict(self) -> dict[str, np.ndarray]:
        """The mapping ``ChunkReplay.add_offline`` takes."""
        out = {
            "observations": self.observations,
            "actions": self.actions,
            "rewards": self.rewards,
            "terminals": self.terminals,
            "masks": self.masks,
            "next_observations": self.next_observations,
        }
        out.update({f"images/{k}": v for k, v in self.images.items()})
        out.update({f"next_images/{k}": v for k, v in self.next_images.items()})
        return out


def _demo_names(data: h5py.Group) -> list[str]:
    demos = [k for k in data if _DEMO_RE.match(k)]
    return sorted(demos, key=lambda k: int(k.split("_")[1]))


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not an HDF5 file ({e})") from None


def _check_header(path: str, f: h5py.File) -> tuple[h5py.Group, dict[str, Any]]:
    data = f.get("data")
    if not isinstance(data, h5py.Group):
        raise DatasetError(f"{path}: not the robomimic layout: no group 'data'")
    fmt = data.attrs.get("format")
    # No 'format' attr: a plain robomimic file, which we read as well.
    if fmt is not None and _str(fmt) != FORMAT:
        raise DatasetError(f"{path}: data.attrs['format'] is {_str(fmt)!r}, expected {FORMAT!r}")
    if int(data.attrs.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise DatasetError(f"{path}: data.attrs['format_version'] is newer than {FORMAT_VERSION}")
    raw = data.attrs.get("env_args", "{}")
    try:
        env_args = json.loads(_str(raw))
    except json.JSONDecodeError:
        raise DatasetError(f"{path}: data.attrs['env_args'] is not valid JSON") from None
    return data, env_args


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _read_demo(path: str, demo: h5py.Group, obs_keys: list[str]) -> dict[str, np.ndarray]:
    """Read and check one complete demo; raises DatasetError naming file and key."""
    where = f"{path}: {demo.name}"
    out: dict[str, np.ndarray] = {}
    for k in ("actions", "rewards", "dones"):
        if k not in demo:
            raise DatasetError(f"{where}/{k} is missing")
        out[k] = np.asarray(demo[k][()], dtype=np.float32)
    n = len(out["actions"])
    if out["actions"].ndim != 2:
        raise DatasetError(f"{where}/actions has shape {out['actions'].shape}, expected (N, A)")
    if int(demo.attrs["num_samples"]) != n:
        raise DatasetError(
            f"{where}/actions has {n} rows but attrs['num_samples'] = {int(demo.attrs['num_samples'])}"
        )
    for k in ("rewards", "dones"):
        if out[k].shape != (n,):
            raise DatasetError(f"{where}/{k} has shape {out[k].shape}, expected ({n},)")
    for group in ("obs", "next_obs"):
        for key in obs_keys:
            full = f"{group}/{key}"
            if full not in demo:
                raise DatasetError(f"{where}/{full} is missing")
            ds = demo[full]
            # images stay bytes (a quarter of float32's memory); everything else is float32
            v = np.asarray(ds[()]) if is_image_step(ds.shape[1:], ds.dtype) else np.asarray(ds[()], dtype=np.float32)
            if len(v) != n:
                raise DatasetError(f"{where}/{full} has {len(v)} rows, actions has {n}")
            out[full] = v
    for k, v in out.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise DatasetError(f"{where}/{k} contains NaN or inf")
    return out


def is_image_step(step_shape: Sequence[int], dtype: Any) -> bool:
    """An image observation the agent encodes: uint8 steps of shape (H, W, C) (robomimic's
    camera keys); read as bytes, never flattened into the state."""
    return len(step_shape) == 3 and np.dtype(dtype) == np.uint8


def load_flat(
    path: str | os.PathLike[str],
    obs_keys: list[str] | None = None,
    reward_shift: float = 0.0,
    sparse_reward: bool = False,
    filter_key: str | None = None,
    need_rewards: bool = True,
) -> FlatDataset:
    """Load every complete demo of ``path`` as flat float32 arrays.

    Observations of several keys are flattened per step and concatenated in ``obs_keys`` order
    (default: the sorted keys of the first demo). Image keys (uint8 (H, W, C) steps) are not
    flattened: they come back as uint8 arrays in ``images``/``next_images``. ``sparse_reward`` maps rewards to 0 where they
    are 0 and -1 elsewhere (the paper's sparse setting) before ``reward_shift`` is added.
    ``filter_key`` restricts to the demos listed in ``mask/<filter_key>``.

    A file whose rewards come from verdicts (a robot's recording: ``rewards.reward_source``) gets
    each demo's rewards and terminations from its ``label``, in the sparse convention whatever
    ``sparse_reward`` says. A demo there without a verdict ('unlabelled') raises DatasetError
    when ``need_rewards`` (RL), else its rewards are NaN (readers that ignore rewards: BC, stats).
    """
    path = os.fspath(path)
    try:
        return _load_flat(path, obs_keys, reward_shift, sparse_reward, filter_key, need_rewards)
    except (KeyError, OSError, RuntimeError) as e:
        # h5py's own errors: a damaged file (e.g. a link past the end after a killed write)
        raise DatasetError(f"{path}: damaged HDF5 structure ({e})") from None


def _selected_demos(path: str, f: Any, data: Any, filter_key: str | None) -> list[str]:
    """The file's demo group names, restricted to robomimic's ``mask/<filter_key>`` when given."""
    names = _demo_names(data)
    if filter_key is None:
        return names
    mask = f.get(f"mask/{filter_key}")
    if mask is None:
        raise DatasetError(f"{path}: mask/{filter_key} is missing")
    wanted = {_str(x) for x in mask[()]}
    return [n for n in names if n in wanted]


def _load_flat(
    path: str, obs_keys: list[str] | None, reward_shift: float, sparse_reward: bool, filter_key: str | None,
    need_rewards: bool = True,
) -> FlatDataset:
    with _open(path) as f:
        data, env_args = _check_header(path, f)
        try:
            source = reward_source(env_args)
        except ValueError as e:
            raise DatasetError(f"{path}: {e}") from None
        names = _selected_demos(path, f, data, filter_key)
        complete = [n for n in names if "num_samples" in data[n].attrs]
        if len(complete) < len(names):
            warnings.warn(
                f"{path}: skipping {len(names) - len(complete)} incomplete demo(s)", stacklevel=2
            )
        if not complete:
            raise DatasetError(f"{path}: empty file: no complete data/demo_<i> groups")
        first = data[complete[0]]
        if "obs" not in first:
            raise DatasetError(f"{path}: {first.name}/obs is missing")
        keys = list(obs_keys) if obs_keys is not None else sorted(first["obs"].keys())
        if not keys:
            raise DatasetError(f"{path}: {first.name}/obs has no keys")
        demos = [_read_demo(path, data[n], keys) for n in complete]
        if source == FROM_VERDICT:
            for n, d in zip(complete, demos, strict=True):
                _apply_verdict(path, n, _str(data[n].attrs.get("label", "")), d, need_rewards)
        if filter_key is None and "total" in data.attrs:
            total = sum(len(d["actions"]) for d in demos)
            if int(data.attrs["total"]) != total:
                raise DatasetError(
                    f"{path}: data.attrs['total'] = {int(data.attrs['total'])}, demos hold {total}"
                )

    obs_shapes = {k: tuple(demos[0][f"obs/{k}"].shape[1:]) for k in keys}
    act_dim = demos[0]["actions"].shape[1]
    for name, d in zip(complete, demos, strict=True):
        if d["actions"].shape[1] != act_dim:
            raise DatasetError(
                f"{path}: data/{name}/actions has width {d['actions'].shape[1]}, first demo has {act_dim}"
            )
        for k in keys:
            for group in ("obs", "next_obs"):
                if d[f"{group}/{k}"].shape[1:] != obs_shapes[k]:
                    raise DatasetError(
                        f"{path}: data/{name}/{group}/{k} has step shape {d[f'{group}/{k}'].shape[1:]}, "
                        f"expected {obs_shapes[k]}"
                    )

    image_keys = [k for k in keys if demos[0][f"obs/{k}"].dtype == np.uint8 and len(obs_shapes[k]) == 3]
    vec_keys = [k for k in keys if k not in image_keys]
    for name, d in zip(complete, demos, strict=True):
        for k in keys:
            for group in ("obs", "next_obs"):
                if (k in image_keys) != (d[f"{group}/{k}"].dtype == np.uint8):
                    raise DatasetError(f"{path}: data/{name}/{group}/{k} has dtype {d[f'{group}/{k}'].dtype}, "
                                       f"the first demo's obs/{k} has {demos[0][f'obs/{k}'].dtype}")

    def flat(group: str) -> np.ndarray:
        # per demo: (N, *shape) -> (N, prod(shape)), keys side by side -> (N, O); demos stacked -> (T, O)
        return np.concatenate(
            [
                np.concatenate(
                    [d[f"{group}/{k}"].reshape(len(d["actions"]), -1) for k in vec_keys]
                    or [np.zeros((len(d["actions"]), 0), np.float32)], axis=1
                )
                for d in demos
            ]
        )

    def stack(group: str) -> dict[str, np.ndarray]:
        return {k: np.concatenate([d[f"{group}/{k}"] for d in demos]) for k in image_keys}  # (T, H, W, C)

    lengths = np.array([len(d["actions"]) for d in demos], dtype=np.int64)
    ends = np.cumsum(lengths)
    terminals = np.zeros(int(ends[-1]), dtype=np.float32)
    terminals[ends - 1] = 1.0
    rewards = np.concatenate([d["rewards"] for d in demos])
    if sparse_reward and source == FROM_RECORDED:  # verdict rewards are sparse already
        rewards = sparsify(rewards)
    return FlatDataset(
        observations=flat("obs"),
        actions=np.concatenate([d["actions"] for d in demos]),
        rewards=(rewards + np.float32(reward_shift)).astype(np.float32),
        terminals=terminals,
        masks=1.0 - np.concatenate([d["dones"] for d in demos]),
        next_observations=flat("next_obs"),
        obs_keys=keys,
        obs_shapes=obs_shapes,
        env_args=env_args,
        episode_ends=ends,
        demo_names=complete,
        images=stack("obs"),
        next_images=stack("next_obs"),
        reward_source=source,
    )


def _apply_verdict(path: str, name: str, label: str, d: dict[str, np.ndarray], need_rewards: bool) -> None:
    """Replace one demo's recorded rewards and dones (a robot's reward 0: never a success signal)
    by those of its verdict."""
    n = len(d["actions"])
    out = verdict_rewards(label, n)
    if out is None:
        if need_rewards:
            raise DatasetError(
                f"{path}: data/{name} has no verdict (label {label or '<none>'!r}), so its rewards are unknown "
                f"and RL cannot use this file; give it one with `qc-robot dataset label {path} {name} "
                f"success|failure`, or train on the labelled demos only (data.filter_key)")
        out = np.full(n, np.nan, np.float32), np.zeros(n, np.float32)
    d["rewards"], d["dones"] = out


def vector_obs_keys(
    path: str | os.PathLike[str], filter_key: str | None = None
) -> tuple[list[str], list[str]]:
    """(vector keys, image keys) of the first complete demo's ``obs`` group, each sorted.

    A key whose steps have more than one axis (robomimic images are (H, W, C) uint8) cannot go
    into an MLP as it is; the learner's default leaves such keys out rather than flattening raw
    pixels into the network. Raises :class:`DatasetError` when no vector key is left.
    """
    path = os.fspath(path)
    with _open(path) as f:
        data, _ = _check_header(path, f)
        names = _selected_demos(path, f, data, filter_key)
        first = next((data[n] for n in names if "num_samples" in data[n].attrs), None)
        if first is None:
            raise DatasetError(f"{path}: empty file: no complete data/demo_<i> groups")
        if "obs" not in first:
            raise DatasetError(f"{path}: {first.name}/obs is missing")
        shapes = {k: first["obs"][k].shape[1:] for k in first["obs"]}
    vec = sorted(k for k, s in shapes.items() if len(s) <= 1)
    img = sorted(k for k, s in shapes.items() if len(s) > 1)
    if not vec:
        raise DatasetError(
            f"{path}: every observation key has multi-axis steps ({img}); set data.obs_keys"
        )
    return vec, img


def validate(path: str | os.PathLike[str], need_rewards: bool = True) -> list[str]:
    """Problems found in ``path`` (an empty list means the file loads cleanly; ``need_rewards``:
    for RL, so a robot's demo without a verdict is one)."""
    path = os.fspath(path)
    problems: list[str] = []
    try:
        with _open(path) as f:
            data, _ = _check_header(path, f)
            names = _demo_names(data)
            for n in names:
                if "num_samples" not in data[n].attrs:
                    problems.append(f"{path}: data/{n} is incomplete (no attrs['num_samples'])")
    except DatasetError as e:
        return [str(e)]
    except (KeyError, OSError, RuntimeError) as e:
        return [f"{path}: damaged HDF5 structure ({e})"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_flat(path, need_rewards=need_rewards)
    except DatasetError as e:
        problems.append(str(e))
    return problems
