"""Shared fixtures: a tiny locally generated dataset (real MuJoCo, real HDF5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qc_robot.video import use_offscreen_gl

use_offscreen_gl()  # before any test imports mujoco: it picks its GL backend (EGL headless) once


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cube-single-task1 play data: 3 episodes x 60 steps from OGBench's oracle."""
    from qc_robot.sim.datagen import generate

    out = tmp_path_factory.mktemp("data") / "cube-single-task1.hdf5"
    generate("cube-single-task1", num_episodes=3, episode_length=60, noise=0.1, seed=0,
             out_path=str(out), progress=False)
    return out


@pytest.fixture(scope="session")
def offscreen_gl() -> None:
    """Skip a rendering test where no offscreen GL context (EGL/OSMesa) can be made."""
    import mujoco

    try:
        mujoco.GLContext(8, 8).free()
    except Exception as e:  # no EGL/OSMesa here: nothing to render with
        pytest.skip(f"no offscreen GL context: {e}")
