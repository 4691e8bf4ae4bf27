"""Observation/action statistics and action limits of a dataset (our robomimic-layout HDF5).

The statistics go into the calibration file so that training, the server and the robot agree on
them, and so a new dataset whose statistics moved (a sensor re-mounted, a joint re-zeroed) shows
up as a changed calibration id instead of a silently worse policy.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

PERCENTILES = (1, 5, 50, 95, 99)


def array_stats(x: np.ndarray) -> dict[str, Any]:
    """Per-column mean, std, min, max and percentiles of ``x`` (T, D) as JSON-ready lists."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)  # (T, D)
    pct = np.percentile(x, PERCENTILES, axis=0)  # (P, D)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(),
            "max": x.max(0).tolist(), "percentiles": {f"p{p}": pct[i].tolist() for i, p in enumerate(PERCENTILES)},
            "n": int(len(x))}


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 (first 16 hex) of a file: which dataset the statistics came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_stats(path: str | os.PathLike[str], obs_keys: list[str] | None = None,
                  limit_margin: float = 0.0) -> dict[str, Any]:
    """The calibration's ``normalization`` section for an HDF5 episode file.

    ``action_limits`` are the observed per-dimension min/max widened by ``limit_margin`` times the
    range (0: exactly what the data covers).
    """
    from qc_robot.data.hdf5_io import load_flat  # h5py only when a dataset is read

    path = os.fspath(path)
    ds = load_flat(path, obs_keys=obs_keys)
    obs: dict[str, Any] = {}
    col = 0
    for k in ds.obs_keys:
        width = int(np.prod(ds.obs_shapes[k]))
        obs[k] = array_stats(ds.observations[:, col : col + width])  # (T, width) of this key
        obs[k]["shape"] = list(ds.obs_shapes[k])
        col += width
    act = array_stats(ds.actions)
    lo, hi = np.asarray(act["min"]), np.asarray(act["max"])
    pad = limit_margin * (hi - lo)
    return {"obs": obs, "action": act, "action_limits": {"low": (lo - pad).tolist(), "high": (hi + pad).tolist()},
            "dataset": os.path.abspath(path), "dataset_sha256": file_digest(path), "episodes": len(ds.episode_ends),
            "transitions": len(ds)}
