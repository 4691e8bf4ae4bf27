"""Online data as it arrives: each robot's open episode is sampled before it ends.

The learner's replay is one flat store in which a chunk may span consecutive rows, so rows of two
robots must never alternate there; that is why finished episodes enter it whole. An episode still
running would otherwise wait until its end (the learner an episode behind the data, and the last,
unfinished episode never used). Here each driver session's open episode lives in a small staging
buffer of its own, appended chunk by chunk as records arrive, exactly like the in-process loop
appends its open episode: its rows are contiguous and a chunk never runs past the newest one. A
batch draws its start rows uniformly over every row a chunk can start at, the main replay and all
staging buffers together, so an open episode's rows count the same as a finished one's. When the
episode ends its rows move into the main replay and the staging buffer is dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from qc_robot.data.batch import ChunkBatch, cat_batches
from qc_robot.data.replay import ChunkReplay


def replay_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Assembler rows (``episodes.FIELDS``) → replay fields: terminals = the episode ended (either
    way), masks = 1 - true termination."""
    term = rows["terminated"].astype(np.float32)
    out = {"observations": rows["obs"], "actions": rows["actions"], "rewards": rows["rewards"].astype(np.float32),
           "terminals": np.maximum(term, rows["truncated"].astype(np.float32)), "masks": 1.0 - term,
           "next_observations": rows["next_obs"]}
    # image rows (uint8) ride along under the replay's own names
    out.update({k: v for k, v in rows.items() if k.startswith(("images/", "next_images/"))})
    return out


class OnlineReplay:
    """The main replay plus one staging buffer per open episode (keyed by driver session)."""

    def __init__(self, main: ChunkReplay, horizon: int, discount: float, initial_rows: int = 512) -> None:
        self.main, self.horizon, self.discount = main, horizon, discount
        self.initial_rows = initial_rows
        self.open: dict[str, ChunkReplay] = {}

    @property
    def open_rows(self) -> int:
        return sum(b.size for b in self.open.values())

    def stage(self, session: str, rows: dict[str, np.ndarray]) -> None:
        """Append an open episode's newest rows (assembler fields) to its session's buffer."""
        n = len(rows["rewards"])
        if n == 0:
            return
        buf = self.open.get(session)
        if buf is None:
            buf = self.open[session] = self._buffer(max(self.initial_rows, n))
        elif buf.size + n > buf.capacity:  # grow: episodes have no fixed length on a robot
            bigger = self._buffer(max(2 * buf.capacity, buf.size + n))
            bigger.extend(buf.numpy())
            buf = self.open[session] = bigger
        buf.extend(replay_rows(rows))

    def commit(self, session: str, rows: dict[str, np.ndarray]) -> None:
        """The session's episode ended: its rows (whole, as finally flagged) go into the main replay."""
        self.open.pop(session, None)
        self.main.extend(replay_rows(rows))

    def clear(self) -> None:
        self.open.clear()

    def startable(self) -> list[tuple[ChunkReplay, int]]:
        """(buffer, rows a chunk can start at) for the main replay and each open episode."""
        out = [(self.main, max(0, self.main.size - self.horizon + 1))]
        out += [(b, b.size - self.horizon + 1) for b in self.open.values() if b.size >= self.horizon]
        return out

    @property
    def size(self) -> int:
        """Rows held, open episodes included."""
        return self.main.size + self.open_rows

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> ChunkBatch:
        """``batch_size`` chunks with start rows uniform over every startable row of every buffer."""
        bufs = self.startable()
        counts = torch.tensor([n for _, n in bufs], dtype=torch.float64)
        total = int(counts.sum())
        if total <= 0:
            raise ValueError(f"the replay holds no whole chunk ({self.horizon} rows) yet")
        if len(bufs) == 1:
            return self.main.sample(batch_size, self.horizon, self.discount, generator=generator)
        device = self.main.device
        draws = torch.randint(0, total, (batch_size,), generator=generator, device=device)
        edges = torch.cumsum(counts, 0).to(device=device, dtype=draws.dtype)  # (N,)
        which = torch.searchsorted(edges, draws, right=True)  # (B,) buffer index of each draw
        starts = draws - torch.cat([edges.new_zeros(1), edges[:-1]])[which]  # (B,) local start rows
        parts = []
        n_main = int((which == 0).sum())
        if n_main:  # the main replay draws its own starts: it knows its ring's seam
            parts.append(self.main.sample(n_main, self.horizon, self.discount, generator=generator))
        for i, (buf, _) in enumerate(bufs[1:], start=1):
            if bool((which == i).any()):
                parts.append(buf.gather(starts[which == i], self.horizon, self.discount))
        return cat_batches(parts)

    def _buffer(self, rows: int) -> ChunkReplay:
        return ChunkReplay(self.main.obs_dim, self.main.act_dim, rows, self.main.device,
                           image_shapes=self.main.image_shapes, frame_stack=self.main.frame_stack)
