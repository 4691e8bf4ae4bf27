"""A live view of the control loop in Rerun (https://rerun.io): observations, actions, chunk
seams and round-trip latency, step by step, as the driver runs.

``qc-robot drive ... viz=rerun`` spawns the Rerun viewer; ``viz=run.rrd`` records to a file to
open later with ``rerun run.rrd``. Needs ``pip install "qc-robot[viz]"`` (rerun-sdk). Logged
per executed step, on the ``step`` timeline (and the episode as a separate timeline):

- ``obs/<key>``: each observation array as scalar series (one per dimension);
- ``action``: the command the robot applied (after the safety layer), one series per dimension;
- ``chunk/seam``: 1 at the first step of each new chunk, 0 elsewhere; ``chunk/held`` the hold;
- ``latency/rtt_ms``: the round trip of the newest chunk request;
- ``reward`` and ``success``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RerunView:
    """``run_episode``'s ``on_rows`` for Rerun; one instance per ``drive`` run."""

    def __init__(self, target: str, executor: Any, app_id: str = "qc-robot") -> None:
        import rerun as rr

        self.rr, self.executor = rr, executor
        if target == "rerun":
            rr.init(app_id, spawn=True)
        elif target.endswith(".rrd"):
            rr.init(app_id)
            rr.save(target)
        else:
            raise ValueError(f"viz: {target!r} is neither 'rerun' (spawn the viewer) nor a FILE.rrd")
        self._seq = -2
        self._rtts = 0
        self._episode = 0

    def episode(self, i: int) -> Any:
        """The ``on_rows`` callback for episode ``i``."""
        self._episode, self._seq = i, -2
        self.rr.log("events", self.rr.TextLog(f"episode {i} starts"))
        return self.on_rows

    def on_rows(self, rows: list[Any]) -> None:
        rr = self.rr
        for row in rows:
            rr.set_time("step", sequence=int(row.step))
            rr.set_time("episode", sequence=self._episode)
            for key, value in row.obs.items():
                rr.log(f"obs/{key}", rr.Scalars(np.ravel(value).astype(np.float64)))
            rr.log("action", rr.Scalars(np.ravel(row.action).astype(np.float64)))
            seq = self.executor.last_seq
            rr.log("chunk/seam", rr.Scalars(float(seq != self._seq)))
            rr.log("chunk/held", rr.Scalars(float(row.held)))
            self._seq = seq
            rtt = self.executor.stats.rtt_ms
            if len(rtt) > self._rtts:
                rr.log("latency/rtt_ms", rr.Scalars(float(rtt[-1])))
                self._rtts = len(rtt)
            rr.log("reward", rr.Scalars(float(row.reward)))
            rr.log("success", rr.Scalars(float(row.success)))

    def close(self) -> None:
        self.rr.disconnect()


def chain(*callbacks: Any) -> Any:
    """One ``on_rows`` calling each non-None callback in turn (None when there is none)."""
    live = [c for c in callbacks if c is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def both(rows: list[Any]) -> None:
        for c in live:
            c(rows)

    return both
