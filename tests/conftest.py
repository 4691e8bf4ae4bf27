"""Shared fixtures: a tiny locally generated dataset (real MuJoCo, real HDF5)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from qc_robot.video import use_offscreen_gl

use_offscreen_gl()  # before any test imports mujoco: it picks its GL backend (EGL headless) once


def _stream_handlers() -> set[tuple[str, int]]:
    """(logger name, id) of every plain StreamHandler on any logger (pytest's own are subclasses)."""
    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger)]
    return {(x.name, id(h)) for x in loggers for h in x.handlers if type(h) is logging.StreamHandler}


@pytest.fixture(autouse=True)
def _no_leaked_stream_handlers() -> Iterator[None]:
    """A StreamHandler that a test's code adds (a verb's ``basicConfig``, Ray's logging set-up)
    writes to that test's captured stderr, which pytest closes afterwards: every later test that
    logs would get "--- Logging error ---" on its own stderr. Remove what the test added."""
    before = _stream_handlers()
    yield
    for name, _ in _stream_handlers() - before:
        log = logging.getLogger() if name == "root" else logging.getLogger(name)
        for h in [h for h in log.handlers if type(h) is logging.StreamHandler and (name, id(h)) not in before]:
            log.removeHandler(h)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cube-single-task1 play data: 3 episodes x 60 steps from OGBench's oracle."""
    from qc_robot.sim.datagen import generate

    out = tmp_path_factory.mktemp("data") / "cube-single-task1.hdf5"
    generate("cube-single-task1", num_episodes=3, episode_length=60, noise=0.1, seed=0,
             out_path=str(out), progress=False)
    return out


@pytest.fixture
def ray_local():
    """A small local Ray instance (2 CPUs), shut down after the test (run_tasks joins a running one)."""
    from skip_reasons import RAY_MISSING

    ray = pytest.importorskip("ray", reason=RAY_MISSING)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def offscreen_gl() -> None:
    """Skip a rendering test where no offscreen GL context (EGL/OSMesa) can be made."""
    import mujoco

    try:
        mujoco.GLContext(8, 8).free()
    except Exception as e:  # no EGL/OSMesa here: nothing to render with
        pytest.skip(f"no offscreen GL context: {e}")
