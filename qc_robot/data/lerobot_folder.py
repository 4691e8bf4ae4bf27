"""Read a local LeRobotDataset folder without LeRobot: its metadata, episodes and per-frame columns.

Both on-disk layouts LeRobot has written since 2025 are understood (facts from LeRobot's
``lerobot/datasets/utils.py``, not its code):

* ``v3.0`` (LeRobot 0.4): ``meta/info.json``, ``meta/tasks.parquet`` (task strings as the pandas
  index, ``task_index``), ``meta/episodes/chunk-*/file-*.parquet`` (per episode: ``length``,
  ``tasks`` and, per camera, the video file and the episode's ``from_timestamp`` in it),
  ``data/chunk-*/file-*.parquet`` holding many episodes, ``videos/<key>/chunk-*/file-*.mp4``;
* ``v2.0``/``v2.1`` (LeRobot 0.1-0.3): ``meta/tasks.jsonl``, ``meta/episodes.jsonl``, one
  ``data/chunk-*/episode_*.parquet`` and one MP4 per episode and camera.

Needs pyarrow (``qc-robot[lerobot-data]``). Every problem is a DatasetError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qc_robot.data.hdf5_io import DatasetError

VERSIONS = ("v2.0", "v2.1", "v3.0")
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
"""Columns LeRobot adds to every dataset."""


@dataclass
class Episode:
    index: int
    length: int
    tasks: list[str]
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)
    """Camera feature → (its MP4, the episode's first timestamp within it)."""


@dataclass
class LeRobotFolder:
    root: Path
    version: str
    fps: float
    robot_type: str
    features: dict[str, dict[str, Any]]
    tasks: dict[int, str]
    episodes: list[Episode]

    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]

    def read_rows(self, columns: list[str]) -> dict[str, Any]:
        """``columns`` (plus the bookkeeping ones) of every frame, sorted by the global ``index``:
        a mapping of column name → pyarrow array."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted((self.root / "data").glob("**/*.parquet"))
        if not files:
            raise DatasetError(f"{self.root}/data: no parquet files")
        want = list(dict.fromkeys([*columns, "episode_index", "frame_index", "index", "timestamp", "task_index"]))
        tables = []
        for f in files:
            try:
                t = pq.read_table(f, columns=want)
            except (pa.ArrowInvalid, KeyError) as e:
                raise DatasetError(f"{f}: cannot read the columns {want} ({e})") from None
            tables.append(t)
        table = pa.concat_tables(tables).combine_chunks()
        order = np.argsort(np.asarray(table.column("index").to_numpy()), kind="stable")
        table = table.take(pa.array(order))
        return {c: table.column(c).combine_chunks() for c in want}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (not a LeRobotDataset folder?)") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON lines ({e})") from None


def _parquet_rows(paths: list[Path], what: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not paths:
        raise DatasetError(f"{what}: missing")
    rows: list[dict[str, Any]] = []
    for p in paths:
        try:
            t = pq.read_table(p)
        except pa.ArrowInvalid as e:
            raise DatasetError(f"{p}: not a parquet file ({e})") from None
        rows += t.drop_columns([c for c in t.column_names if c.startswith("stats/")]).to_pylist()
    return rows


def _tasks_v3(root: Path) -> dict[int, str]:
    """meta/tasks.parquet: ``task_index`` and the task string (the pandas index LeRobot writes)."""
    path = root / "meta" / "tasks.parquet"
    out: dict[int, str] = {}
    for row in _parquet_rows([path] if path.exists() else [], path):
        text = row.get("task", next((v for k, v in row.items() if k != "task_index" and isinstance(v, str)), None))
        if text is None:
            raise DatasetError(f"{root}/meta/tasks.parquet: no task string column")
        out[int(row["task_index"])] = str(text)
    return out


def open_folder(path: str | Path) -> LeRobotFolder:
    """The metadata of the LeRobotDataset at ``path``; raises DatasetError on anything missing."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (give a local LeRobotDataset folder, the one "
                           "holding meta/info.json)")
    info = _json(root / "meta" / "info.json")
    version = str(info.get("codebase_version", ""))
    if version not in VERSIONS:
        raise DatasetError(f"{root}/meta/info.json: codebase_version {version or '<none>'!r} is not one "
                           f"of {', '.join(VERSIONS)} (convert it with LeRobot's own converter first)")
    features = info.get("features")
    if not isinstance(features, dict) or "action" not in features:
        raise DatasetError(f"{root}/meta/info.json: no 'action' feature (found {sorted(features or {})})")
    if not any(k.startswith("observation.") for k in features):
        raise DatasetError(f"{root}/meta/info.json: no 'observation.*' feature (found {sorted(features)})")
    fps = float(info.get("fps") or 0)
    if fps <= 0:
        raise DatasetError(f"{root}/meta/info.json: no positive 'fps'")
    cams = [k for k, f in features.items() if f.get("dtype") == "video"]
    episodes: list[Episode] = []
    if version == "v3.0":
        tasks = _tasks_v3(root)
        rows = _parquet_rows(sorted((root / "meta" / "episodes").glob("**/*.parquet")), root / "meta" / "episodes")
        for r in rows:
            videos = {}
            for k in cams:
                rel = info["video_path"].format(video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                                file_index=r[f"videos/{k}/file_index"])
                videos[k] = (root / rel, float(r[f"videos/{k}/from_timestamp"]))
            episodes.append(Episode(int(r["episode_index"]), int(r["length"]), list(r.get("tasks") or []), videos))
    else:
        tasks = {int(r["task_index"]): str(r["task"]) for r in _jsonl(root / "meta" / "tasks.jsonl")}
        chunk = int(info.get("chunks_size") or 1000)
        for r in _jsonl(root / "meta" / "episodes.jsonl"):
            i = int(r["episode_index"])
            videos = {k: (root / info["video_path"].format(episode_chunk=i // chunk, video_key=k, episode_index=i), 0.0)
                      for k in cams}
            episodes.append(Episode(i, int(r["length"]), list(r.get("tasks") or []), videos))
    if not episodes:
        raise DatasetError(f"{root}: the dataset holds no episodes")
    episodes.sort(key=lambda e: e.index)
    return LeRobotFolder(root, version, fps, str(info.get("robot_type") or ""), features, tasks, episodes)


def as_matrix(column: Any, rows: int, name: str) -> np.ndarray:
    """A numeric column (scalars or fixed-length lists) as an (N, D) numpy array."""
    import pyarrow as pa

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
            pa.types.is_fixed_size_list(column.type):
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False))
        if rows and values.size % rows:
            raise DatasetError(f"column {name!r} has rows of different lengths")
        return values.reshape(rows, -1)
    return np.asarray(column.to_numpy(zero_copy_only=False)).reshape(rows, -1)
