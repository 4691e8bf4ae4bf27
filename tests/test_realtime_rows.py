"""Realtime transitions are exact: one row per step the robot executed, under CPU load.

A wall-clock MuJoCo robot served by a real control server (random chunks over ZeroMQ) runs an
episode while other processes and a GIL-hungry thread load the machine. Its rows must be the
robot's steps one by one (consecutive, chained, none whose world did not advance, no extra row at
the end, no default outcome before the first tick), and replaying the logged actions through a
lockstep copy of the same task must reproduce every next observation and reward bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qc_robot.drivers.base import ExecutedStep
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.registry import make_safe_driver
from qc_robot.drivers.runner import Pacer, run_episode
from qc_robot.drivers.sim import SimConfig
from qc_robot.policies.scripted import RandomPolicy, simple_spec
from qc_robot.server.app import ControlServer
from qc_robot.server.episode_log import EpisodeLogger

TASK, OBS, ACT, H, STEPS = "cube-single-task1", 28, 5, 5, 60


class _Load:
    """Busy processes on every core plus a thread in this process that competes for the GIL."""

    def __init__(self, procs: int = 2) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(procs)]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for i in range(20_000):  # pure Python: holds the GIL for its switch interval each time
                x += i

    def __enter__(self) -> _Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        for p in self.procs:
            p.kill()
            p.wait(5)


@pytest.fixture
def served(tmp_path: Path):
    logger = EpisodeLogger(str(tmp_path), {"source": "test"})
    srv = ControlServer(RandomPolicy(simple_spec(OBS, ACT, H), seed=3, scale=0.8), "tcp://127.0.0.1:*",
                        episode_logger=logger).start()
    yield srv
    srv.stop()


def _replay(rows: list[ExecutedStep], seed: int) -> None:
    """The logged actions through a lockstep copy of the task reproduce every logged outcome (to
    round-off: the robot's thread and this one may run with different floating-point modes, e.g.
    flush-to-zero set by a numeric library, and MuJoCo amplifies last-bit differences over the
    episode; a wrong or missing step diverges by orders of magnitude more)."""
    twin = make_safe_driver("sim", SimConfig(env=TASK, realtime=False, max_episode_steps=STEPS))
    obs = twin.reset(seed)["state"]
    try:
        for r in rows:
            np.testing.assert_allclose(r.obs["state"], obs, rtol=1e-6, atol=1e-9, err_msg=f"row {r.step}: obs")
            twin.driver.send_action(r.action)
            obs, info = twin.get_observation()["state"], twin.step_info()
            np.testing.assert_allclose(r.next_obs["state"], obs, rtol=1e-6, atol=1e-9,
                                       err_msg=f"row {r.step}: next_obs")
            assert (r.reward, r.success, r.terminated, r.truncated) == \
                (info.reward, info.success, info.terminated, info.truncated), f"row {r.step}"
    finally:
        twin.close()


@pytest.mark.parametrize("load", [True], ids=["loaded"])
def test_realtime_rows_are_the_robots_steps_one_by_one(served, load: bool) -> None:
    h5py = pytest.importorskip("h5py")
    scale = 4.0  # 80 Hz wall clock: a 12.5 ms period, tight for a loaded 2-core machine
    driver = make_safe_driver("sim", SimConfig(env=TASK, realtime=True, time_scale=scale, max_episode_steps=STEPS))
    driver.connect()
    client = PolicyClient(served.address, driver.spec.hello("sim"))
    client.connect(10.0)
    period = 1.0 / (driver.spec.control_hz * scale)
    ex = ChunkExecutor(client, H, "open_loop", tick_wait_s=0.5 * period)
    rows: list[ExecutedStep] = []
    try:
        with _Load() if load else _NoLoad():
            r = run_episode(driver, ex, 0, 7, Pacer(driver.spec.control_hz * scale), client, send_transitions=True,
                            on_rows=rows.extend)
        robot_steps, held_ticks = driver.step_info().step, driver.driver.missed_ticks
    finally:
        client.close()
        driver.close()
    print(f"load={load}: rows {len(rows)}, robot held {r.robot_held}, loop overruns {r.overruns}, "
          f"robot overruns {driver.driver.overruns}")
    # exactly one row per executed step, in order, and nothing after the end
    assert robot_steps == STEPS and r.rows == len(rows) == STEPS
    assert [x.step for x in rows] == list(range(STEPS))
    # held: the robot applied its hold, because no command came in time (its missed ticks) or the
    # loop had no fresh action and sent the hold (at most the safety layer's holds of the episode)
    assert r.robot_held == sum(x.held for x in rows)
    assert held_ticks <= r.robot_held <= held_ticks + r.held
    assert [x.truncated for x in rows] == [False] * (STEPS - 1) + [True]  # the task's time limit, once
    assert not any(x.terminated for x in rows)
    for a, b in zip(rows, rows[1:], strict=False):
        np.testing.assert_array_equal(a.next_obs["state"], b.obs["state"])  # chained: no step skipped
        assert b.t > a.t and b.wall_time > a.wall_time
    assert all(not np.array_equal(x.obs["state"], x.next_obs["state"]) for x in rows)  # the world moved
    _replay(rows, 7)
    # the same rows reached the server's episode log, with their timestamps and held flags
    served.stop()
    with h5py.File(served.logger.path, "r") as f:
        g = f["data/demo_0"]
        assert g.attrs["num_samples"] == STEPS
        np.testing.assert_array_equal(g["actions"][:], np.stack([x.action for x in rows]))
        np.testing.assert_array_equal(g["held"][:].astype(bool), [x.held for x in rows])
        np.testing.assert_allclose(g["timestamps"][:], [x.wall_time for x in rows])


class _NoLoad:
    def __enter__(self) -> _NoLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_lockstep_rows_carry_the_outcome_of_their_own_step() -> None:
    """A lockstep robot's row i holds step i's reward and flags, and the episode's end once."""
    from qc_robot.drivers.mock import MockConfig
    from qc_robot.server.serve import load_policy

    srv = ControlServer(load_policy("random:10:5:5"), "tcp://127.0.0.1:*").start()
    driver = make_safe_driver("mock", MockConfig(max_episode_steps=12))
    client = PolicyClient(srv.address, driver.spec.hello("mock"))
    try:
        client.connect(5.0)
        rows: list[ExecutedStep] = []
        r = run_episode(driver, ChunkExecutor(client, 5, wait_when_empty=True), 0, 1, None, client,
                        on_rows=rows.extend)
        twin = make_safe_driver("mock", MockConfig(max_episode_steps=12))
        obs = twin.reset(1)
        for x in rows:
            np.testing.assert_array_equal(x.obs["state"], obs["state"])
            twin.driver.send_action(x.action)
            obs, info = twin.get_observation(), twin.step_info()
            np.testing.assert_array_equal(x.next_obs["state"], obs["state"])
            assert (x.reward, x.terminated, x.truncated) == (info.reward, info.terminated, info.truncated)
        assert r.rows == len(rows) == 12 and rows[-1].truncated and not any(x.truncated for x in rows[:-1])
        assert r.overruns == 0
    finally:
        client.close()
        srv.stop()
        time.sleep(0)
