"""Replay of whole episodes, sampled as action chunks.

One flat, preallocated store of transitions in time order; an episode is a run of rows that
ends with ``terminals = 1``. Offline data is loaded first, online transitions are appended after
it, so the offline data stays in the replay (the paper's protocol). Storage is a torch tensor on
the learner's device: sampling is an on-device gather, with no host copies inside an update.

Image observations (``image_shapes``) are stored as uint8 (H, W, C) rows beside the vectors, under
``images/<key>`` and ``next_images/<key>``: a 64x64 RGB camera costs 2·12 KiB per transition
(s and s'), a quarter of float32. With ``frame_stack = k`` a sampled image is the last k frames of
its episode stacked along channels, (H, W, 3k), the first frame repeated at an episode's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qc_robot.data.batch import ChunkBatch

_FIELDS = ("observations", "actions", "rewards", "terminals", "masks", "next_observations")


class ChunkReplay:
    """Transition store with the chunk-sequence sampling of QC_SPEC.

    Rows hold ``observations``, ``actions``, ``rewards``, ``terminals`` (episode ended: termination
    or time limit), ``masks`` (1 - terminated) and ``next_observations``. When full, the oldest
    *online* rows are overwritten; the first ``keep`` rows (the offline dataset) never are.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        capacity: int,
        device: torch.device | str = "cpu",
        image_shapes: Mapping[str, tuple[int, ...]] | None = None,
        frame_stack: int = 1,
    ) -> None:
        self.obs_dim, self.act_dim, self.capacity = obs_dim, act_dim, capacity
        self.device = torch.device(device)
        self.image_shapes = {k: tuple(int(x) for x in v) for k, v in (image_shapes or {}).items()}
        if frame_stack < 1:
            raise ValueError(f"frame_stack must be >= 1, got {frame_stack}")
        self.frame_stack = frame_stack
        self._fields = _FIELDS + tuple(f"{g}/{k}" for g in ("images", "next_images") for k in self.image_shapes)
        z = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=self.device)  # noqa: E731
        self._data: dict[str, torch.Tensor] = {
            "observations": z(capacity, obs_dim),
            "actions": z(capacity, act_dim),
            "rewards": z(capacity),
            "terminals": z(capacity),
            "masks": z(capacity),
            "next_observations": z(capacity, obs_dim),
        }
        for g in ("images", "next_images"):
            for k, shape in self.image_shapes.items():
                # empty, not zeros: rows are written before they are read, and an untouched page of a
                # large host allocation costs no memory (a 500k-row 64x64 replay reserves 12 GiB)
                self._data[f"{g}/{k}"] = torch.empty((capacity, *shape), dtype=torch.uint8, device=self.device)
        self.size = 0
        self.keep = 0  # rows protected from overwrite (the offline dataset)
        self._cursor = 0  # next row to write once full

    # -- filling -----------------------------------------------------------------------------
    def add_offline(self, data: Mapping[str, np.ndarray]) -> None:
        """Load a dataset of whole episodes (flat arrays with the fields above) and protect it."""
        self._append(data)
        self.keep = self._cursor = self.size  # the ring over online rows starts after the dataset

    def add(self, transition: Mapping[str, np.ndarray | float]) -> None:
        """Append one online transition (fields above, unbatched)."""
        rows = {k: np.asarray(transition[k], dtype=np.float32)[None] for k in _FIELDS}
        rows.update({k: np.asarray(transition[k])[None] for k in self._fields[len(_FIELDS):]})
        self.extend(rows)

    def extend(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append online transitions given as arrays with a leading row axis (one copy per field)."""
        self._append(rows)

    def _append(self, data: Mapping[str, np.ndarray]) -> int:
        n = len(data["rewards"])
        for k in self._fields:
            if k not in data:
                raise KeyError(f"replay data is missing '{k}'")
            if len(data[k]) != n:
                raise ValueError(f"replay field '{k}' has {len(data[k])} rows, rewards has {n}")
        if self.size + n > self.capacity and self.keep + n > self.capacity:
            raise ValueError(
                f"replay capacity {self.capacity} cannot hold {self.keep} protected rows plus {n} new ones"
            )
        rows = {k: _tensor(data[k], self.device, self._data[k].dtype).reshape(n, *self._data[k].shape[1:])
                for k in self._fields}
        # Free slots first: the ring only starts overwriting once every slot holds a row.
        free = min(n, self.capacity - self.size)
        if free:
            for k in self._fields:
                self._data[k][self.size : self.size + free] = rows[k][:free]
            self.size += free
            self._cursor = self.size
        done = free
        while done < n:  # then the ring over the online region [keep, capacity), oldest first
            if self._cursor >= self.capacity:
                self._cursor = self.keep
            m = min(n - done, self.capacity - self._cursor)
            for k in self._fields:
                self._data[k][self._cursor : self._cursor + m] = rows[k][done : done + m]
            self._cursor += m
            done += m
        return n

    @property
    def cursor(self) -> int:
        """The row after the newest one (== size until the ring wraps)."""
        return self._cursor

    def _seam(self) -> int | None:
        """Row of the newest transition when the oldest follows it in storage (ring wrapped and
        not at the region's end): chunks must not run from the newest into the oldest row."""
        if self.size == self.capacity and self.keep < self._cursor < self.capacity:
            return self._cursor - 1
        return None

    def end_episode(self) -> bool:
        """Mark the newest online row as its episode's end (a truncation: it still bootstraps), if
        it is not one already; True if it changed. A resumed run starts a fresh episode, which must
        not be glued to the one the interruption cut short."""
        if self.size <= self.keep:
            return False
        last = self._cursor - 1 if self._cursor > self.keep else self.capacity - 1  # the newest row
        if float(self._data["terminals"][last]) >= 1.0:
            return False
        self._data["terminals"][last] = 1.0
        return True

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, batch_size: int, horizon: int, discount: float, generator: torch.Generator | None = None) -> ChunkBatch:
        """Sample ``batch_size`` chunks of length ``horizon`` with uniformly drawn start rows.

        Start rows are drawn from [0, size - horizon] so a chunk never runs past the stored
        data; a chunk may run past its episode's end, and ``valid``/``masks`` then mark the
        padding exactly as QC_SPEC prescribes. Once the ring has wrapped, chunks that would run
        from the newest row into the oldest one are never drawn.
        """
        if self.size < horizon:
            raise ValueError(f"replay holds {self.size} transitions, fewer than one chunk ({horizon})")
        seam = self._seam()
        n_starts = self.size - horizon + 1
        if seam is None or horizon == 1:
            start = torch.randint(0, n_starts, (batch_size,), device=self.device, generator=generator)
        else:
            # Starts seam-h+2 .. seam would run from the newest row into the oldest one (another
            # episode, with no end flag between): draw from the rest, uniformly.
            lo = max(seam - horizon + 2, self.keep)
            bad = max(min(seam, n_starts - 1) - lo + 1, 0)
            start = torch.randint(0, n_starts - bad, (batch_size,), device=self.device, generator=generator)
            start = start + bad * (start >= lo)
        return self.gather(start, horizon, discount)

    def gather(self, start: torch.Tensor, horizon: int, discount: float) -> ChunkBatch:
        """Build the chunk batch for given start rows (B,)."""
        d = self._data
        idx = start[:, None] + torch.arange(horizon, device=self.device)  # (B, h)
        rewards = d["rewards"][idx]  # (B, h)
        terminals = torch.cummax(d["terminals"][idx], dim=1).values  # (B, h) episode ended by step k
        masks = torch.cummin(d["masks"][idx], dim=1).values  # (B, h) no true termination up to k
        valid = torch.ones_like(terminals)
        valid[:, 1:] = 1.0 - terminals[:, :-1]  # steps after the end are padding
        powers = discount ** torch.arange(horizon, device=self.device, dtype=torch.float32)
        cum_rewards = torch.cumsum(rewards * powers * valid, dim=1)  # (B, h) Σ_{j≤k} γ^j r_{t+j}
        images = next_images = None
        if self.image_shapes:
            end = start + horizon - 1
            images = [self._stacked("images", k, start, None) for k in self.image_shapes]
            next_images = [self._stacked("next_images", k, end, self._stacked_rows(end)) for k in self.image_shapes]
        return ChunkBatch(
            observations=d["observations"][start],
            actions=d["actions"][idx],  # (B, h, A)
            rewards=cum_rewards,
            masks=masks,
            terminals=terminals,
            valid=valid,
            next_observations=d["next_observations"][start + horizon - 1],
            images=images,
            next_images=next_images,
        )

    def _stacked_rows(self, row: torch.Tensor) -> list[torch.Tensor]:
        """Rows of the last ``frame_stack`` observations up to ``row`` (B,), oldest first, each
        clamped to the row's episode start (a row whose predecessor ended an episode repeats)."""
        rows = [row]
        cur = row
        term = self._data["terminals"]
        for _ in range(self.frame_stack - 1):
            prev = (cur - 1).clamp(min=0)
            ok = (cur > 0) & (term[prev] < 1.0)  # prev is in the same episode
            cur = torch.where(ok, prev, cur)
            rows.insert(0, cur)
        return rows

    def _stacked(self, group: str, key: str, row: torch.Tensor, obs_rows: list[torch.Tensor] | None) -> torch.Tensor:
        """(B, H, W, C·k) uint8: frames stacked along channels, the newest last. For s'
        (``obs_rows`` given) the stack is s's frames from the rows after the oldest, then s' itself."""
        store = self._data[f"{group}/{key}"]
        if self.frame_stack == 1:
            return store[row]
        if obs_rows is None:
            rows = self._stacked_rows(row)
            return torch.cat([store[r] for r in rows], dim=-1)
        obs_store = self._data[f"images/{key}"]
        return torch.cat([obs_store[r] for r in obs_rows[1:]] + [store[row]], dim=-1)

    # -- inspection --------------------------------------------------------------------------
    def numpy(self) -> dict[str, np.ndarray]:
        """The stored rows as numpy arrays (in storage order)."""
        return {k: v[: self.size].cpu().numpy() for k, v in self._data.items()}

    def online_state(self) -> dict[str, Any]:
        """The online rows (storage order) and the write cursor: what a resume needs on top of
        the offline dataset, which is reloaded from its file."""
        return {"rows": {k: v[self.keep : self.size].cpu().numpy() for k, v in self._data.items()},
                "cursor": self._cursor - self.keep}

    def load_online_state(self, state: Mapping[str, Any]) -> None:
        """Append rows saved by :meth:`online_state` after the offline data and restore the
        cursor, so a wrapped ring overwrites its oldest row next, exactly as before the save."""
        rows = state["rows"]
        if len(rows["rewards"]):
            self.extend(rows)
        cursor = self.keep + int(state.get("cursor", self.size - self.keep))
        if not self.keep <= cursor <= self.size:
            raise ValueError(f"replay cursor {cursor} outside the online rows [{self.keep}, {self.size}]")
        self._cursor = cursor

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "keep": self.keep, "cursor": self._cursor,
                "data": {k: v[: self.size].cpu() for k, v in self._data.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        n = int(state["size"])
        for k in self._fields:
            self._data[k][:n] = state["data"][k].to(self.device)
        self.size, self.keep, self._cursor = n, int(state["keep"]), int(state["cursor"])


def _tensor(x: np.ndarray | torch.Tensor | float, device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype == torch.uint8:
        arr = np.asarray(x)
        if arr.dtype != np.uint8:  # images are bytes; a float image would be silently wrong
            raise ValueError(f"image rows must be uint8, got {arr.dtype}")
        return torch.as_tensor(arr, device=device)
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
