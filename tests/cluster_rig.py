"""Shared by the Ray tests (the ``ray_local`` fixture is in conftest): a task wrapper whose worker
dies once, and shipping test classes to the workers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DieOnce:
    """Tasks of ``inner``; the worker running task ``victim`` the first time exits mid-run
    (``os._exit``, as a killed process would), leaving ``marker`` behind as proof."""

    inner: object
    victim: int
    marker: str

    def __call__(self):
        run = self.inner()  # type: ignore[operator]

        def task(i: int):
            if i == self.victim and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(1)
            return run(i)

        return task


def ship_by_value(ray, *module_names: str) -> None:
    """Ship these test modules' classes to the workers by value (tests/ is not on their path)."""
    for name in (__name__, *module_names):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
