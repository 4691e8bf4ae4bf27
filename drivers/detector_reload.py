"""Swap in a re-exported success detector between episodes (``drive reward_reload=true``).

The operator's overrules are the labels a detector lacks most: the fine-tuned policy's near
misses. Retraining on them (``qc-robot reward`` over the server's ``log_dir`` episodes, with the
same ``out=``) while the robot runs replaces the file atomically (``os.replace``); at each
episode's start :class:`DetectorReload` notices the new file and loads it. A file that does not
load or does not fit the robot is that file's error: one line, and the robot keeps the detector
it had. Threshold and debounce given on the command line stay; otherwise the new file's apply.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from qc_robot.policies.base import ObsField

if TYPE_CHECKING:
    from qc_robot.policies.success_detector import SuccessDetector


def _signature(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (None: no file now)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class DetectorReload:
    """Watches ``path``; :meth:`refresh` returns the detector to use for the next episode."""

    def __init__(self, path: str, load: Callable[[str], SuccessDetector], obs_fields: Iterable[ObsField]) -> None:
        self.path = path
        self._load = load
        self._fields = list(obs_fields)
        self._seen = _signature(path)
        self.reloads = 0
        """New files swapped in."""
        self.refused = 0
        """Changed files that did not load or did not fit the robot (the previous detector stayed)."""

    def refresh(self, detector: SuccessDetector, episode: int) -> SuccessDetector:
        sig = _signature(self.path)
        if sig is None or sig == self._seen:
            return detector
        self._seen = sig  # a bad file is reported once, not at every episode
        try:
            new = self._load(self.path)
            new.check_spec(self._fields)
        except Exception as e:  # noqa: BLE001 (a bad file is its own error; the robot keeps the detector it has)
            self.refused += 1
            print(f"drive: reward model {self.path} changed but is not used ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); episode {episode} keeps the previous one", flush=True)
            return detector
        new.carry_counts(detector)
        self.reloads += 1
        fpr = new.meta.metrics.get("valid", {}).get("episode", {}).get("fpr")
        print(f"drive: reward model {self.path} reloaded before episode {episode} (threshold {new.threshold:g}, "
              f"debounce {new.debounce}" + (f", held-out false positives {fpr:.3f} an episode" if
                                            isinstance(fpr, float) else "") + ")", flush=True)
        return new
