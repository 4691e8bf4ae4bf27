"""Episode logging of what the server serves: Transition messages → our HDF5 episode files.

Drivers stream ``Transition`` messages (obs, applied action, reward, flags). The logger keeps
each open episode in memory and writes it as one ``demo_<i>`` group when it ends (terminal or
truncated row, a new episode id from the same driver, the driver leaving, or server stop), on a
thread of its own so HDF5 I/O never stalls the socket loop. Crash safety is per episode: the
writer flushes each finished episode; a crash loses only the open ones (step-level granularity
is future work, the file format already marks incomplete groups).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qc_robot.protocol import Transition
from qc_robot.server.checks import check_transition

log = logging.getLogger("qc_robot.server")


@dataclass
class _OpenEpisode:
    session: str
    driver: str
    episode_id: int
    parts: list[Transition] = field(default_factory=list)
    success: bool = False
    calibration_id: str = ""


class EpisodeLogger:
    """Collects transitions per (session, episode) and writes finished episodes to one file."""

    def __init__(self, log_dir: str, env_args: dict[str, Any]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = str(Path(log_dir) / f"serve-{stamp}-{int(time.time() * 1e3) % 1000:03d}.hdf5")
        self._env_args = dict(env_args)
        self._open: dict[tuple[str, int], _OpenEpisode] = {}
        self._queue: queue.Queue[_OpenEpisode | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write_loop, name="episode-log", daemon=True)
        self._thread.start()
        self.episodes_written = 0

    def add(self, session: str, driver: str, tr: Transition, calibration_id: str = "") -> None:
        """Append K steps; closes the episode if its last row ends it. Raises ValueError on bad rows.

        ``calibration_id`` (from the driver's Hello) is written to the episode's attrs."""
        check_transition(tr)
        for (s, eid) in [key for key in self._open if key[0] == session and key[1] != tr.episode_id]:
            self._close(s, eid)  # the driver moved on to a new episode
        ep = self._open.setdefault((session, tr.episode_id),
                                   _OpenEpisode(session, driver, tr.episode_id, calibration_id=calibration_id))
        ep.parts.append(tr)
        ep.success = ep.success or tr.success
        if bool(tr.terminals[-1]) or bool(tr.truncated[-1]):
            self._close(session, tr.episode_id)

    def end_session(self, session: str) -> None:
        for key in [k for k in self._open if k[0] == session]:
            self._close(*key)

    def close(self, timeout: float = 10.0) -> None:
        """Write every open episode and stop the writer thread."""
        for key in list(self._open):
            self._close(*key)
        self._queue.put(None)
        self._thread.join(timeout)

    def _close(self, session: str, episode_id: int) -> None:
        ep = self._open.pop((session, episode_id), None)
        if ep is not None and ep.parts:
            self._queue.put(ep)

    def _write_loop(self) -> None:
        from qc_robot.data.hdf5_io import EpisodeWriter  # h5py only when logging is on

        with EpisodeWriter(self.path, self._env_args) as writer:
            while (ep := self._queue.get()) is not None:
                try:
                    cat = np.concatenate
                    parts = ep.parts
                    dones = cat([p.terminals for p in parts])
                    extras = {name: cat([getattr(p, name) for p in parts]) for name in ("timestamps", "held")
                              if all(getattr(p, name) is not None for p in parts)}
                    name = writer.add_episode(
                        obs={k: cat([p.obs[k] for p in parts]) for k in parts[0].obs},
                        actions=cat([p.actions for p in parts]),
                        rewards=cat([p.rewards for p in parts]),
                        dones=dones,
                        next_obs={k: cat([p.next_obs[k] for p in parts]) for k in parts[0].next_obs},
                        attrs={"session": ep.session, "driver": ep.driver, "episode_id": ep.episode_id,
                               "start_step": parts[0].start_step, "success": ep.success,
                               "calibration_id": ep.calibration_id,
                               "complete": bool(dones[-1] or parts[-1].truncated[-1])},
                        extras=extras or None,
                    )
                    self.episodes_written += 1
                    log.info("logged episode %s (%d steps) to %s as %s", ep.episode_id, len(dones), self.path, name)
                except Exception:  # a bad episode must not kill the logger
                    log.exception("could not log episode %s of session %s", ep.episode_id, ep.session)
