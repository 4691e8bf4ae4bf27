"""Drivers, safety layer, chunk executor and the control loop (the per-driver conformance suite over
the registry is tests/test_driver_conformance.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qc_robot import protocol as P
from qc_robot.config import EnvConfig
from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.drive import run_drive
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.mock import MockConfig, MockDriver
from qc_robot.drivers.runner import run_episode
from qc_robot.drivers.safety import SafeDriver, SafetyConfig

# -- conformance over every registered driver: tests/test_driver_conformance.py ---------------------


# -- safety ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class RecordingMock(MockDriver):
    def __init__(self) -> None:
        super().__init__(MockConfig(action_dim=2))
        self.sent: list[np.ndarray] = []
        self.stops = 0

    def _apply(self, action: np.ndarray) -> None:
        self.sent.append(action.copy())
        super()._apply(action)

    def stop(self) -> None:
        self.stops += 1


def safe(cfg: SafetyConfig | None = None) -> tuple[SafeDriver, RecordingMock, Clock]:
    d, clock = RecordingMock(), Clock()
    s = SafeDriver(d, cfg or SafetyConfig(), clock=clock)
    s.reset(0)
    return s, d, clock


def test_safety_clips_limits_and_rejects_nan() -> None:
    s, d, _ = safe()
    np.testing.assert_array_equal(s.act([3.0, -3.0]), [1.0, -1.0])
    np.testing.assert_array_equal(s.act([np.nan, 0.5]), [0.0, 0.0])  # rejected → hold
    np.testing.assert_array_equal(s.act([1.0, 2.0, 3.0]), [0.0, 0.0])  # wrong shape → hold
    assert s.stats.rejected == 2 and s.stats.clipped == 1
    assert all(np.all(np.isfinite(a)) for a in d.sent)


def test_safety_max_delta_per_step() -> None:
    s, _, _ = safe(SafetyConfig(max_delta=[0.25]))
    out = [s.act([1.0, -1.0]) for _ in range(5)]
    np.testing.assert_allclose(out[0], [1.0, -1.0])  # first command: nothing to compare with
    s2, _, _ = safe(SafetyConfig(max_delta=[0.25, 0.5]))
    s2.act([0.0, 0.0])
    steps = [s2.act([1.0, -1.0]) for _ in range(4)]
    np.testing.assert_allclose(steps[0], [0.25, -0.5])
    np.testing.assert_allclose(steps[1], [0.5, -1.0])
    np.testing.assert_allclose(steps[3], [1.0, -1.0])
    with pytest.raises(ValueError):
        safe(SafetyConfig(max_delta=[0.1, 0.1, 0.1]))


def test_watchdog_holds_at_startup_without_tripping() -> None:
    s, d, clock = safe(SafetyConfig(watchdog_s=0.5))
    for _ in range(20):  # 10 s without any action: the policy is not ready yet
        clock.t += 0.5
        np.testing.assert_array_equal(s.act(None), d.hold_action())
    assert s.waiting_for_first_action and s.stats.trips == 0 and s.stats.held == 20


def test_watchdog_hold_mode_trips_then_resumes() -> None:
    s, d, clock = safe(SafetyConfig(watchdog_s=0.5, on_timeout="hold"))
    s.act([0.5, 0.5])
    clock.t = 0.4
    s.act(None)
    assert not s.tripped
    clock.t = 0.6
    np.testing.assert_array_equal(s.act(None), d.hold_action())
    assert s.tripped and s.stats.trips == 1
    np.testing.assert_allclose(s.act([0.3, 0.3]), [0.3, 0.3])  # fresh action: resumes
    assert not s.tripped and d.stops == 0


def test_watchdog_stop_mode_latches_until_rearm() -> None:
    s, d, clock = safe(SafetyConfig(watchdog_s=0.5, on_timeout="stop"))
    s.act([0.5, 0.5])
    clock.t = 1.0
    s.act(None)
    assert s.tripped and d.stops == 1
    n_sent = len(d.sent)
    s.act([0.7, 0.7])  # ignored: stopped robots need an operator
    assert len(d.sent) == n_sent
    s.rearm()
    np.testing.assert_allclose(s.act([0.7, 0.7]), [0.7, 0.7])


# -- executor -------------------------------------------------------------------------------------


class FakeSource:
    """Answers each request ``delay`` steps later (``now`` is advanced by the test) with actions
    whose value encodes the step they are planned for: (start_step + i) / 1000."""

    def __init__(self, h: int, a: int, delay: int = 0) -> None:
        self.h, self.a, self.delay, self.now = h, a, delay, 0
        self.requests: list[int] = []
        self._pending: tuple[int, int, int] | None = None
        self._rid = 0

    def request(self, obs, episode_id: int, step: int, reset: bool = False) -> int:
        self._rid += 1
        self.requests.append(step)
        self._pending = (self._rid, episode_id, step)
        return self._rid

    def poll(self, timeout_s: float = 0.0):
        if self._pending is None or (self.delay and self.now < self._pending[2] + self.delay):
            return None
        rid, ep, step = self._pending
        self._pending = None
        acts = np.repeat(((step + np.arange(self.h)) / 1000.0)[:, None], self.a, 1).astype(np.float32)
        return P.Chunk(rid, ep, step, acts, "v", 0.0, 0.0, 0.0)

    def cancel(self, timed_out: bool = False) -> None:
        self._pending = None


@pytest.mark.parametrize("delay", [1, 3])  # realtime: a reply is taken in at the next tick at best
def test_open_loop_requests_once_per_chunk(delay: int) -> None:
    h, steps = 5, 40
    src = FakeSource(h, 2, delay)
    ex = ChunkExecutor(src, h, "open_loop", wait_when_empty=False)
    executed = []
    for t in range(steps):
        src.now = t
        a = ex.act({}, t, 0)
        if a is not None:
            executed.append(round(float(a[0]) * 1000))
    assert len(src.requests) == math.ceil(steps / (h + delay))
    assert ex.stats.dropped_stale == 0 and len(executed) == ex.stats.executed
    for req in src.requests[:-1]:  # every action of every chunk runs, in order
        assert [s for s in executed if req <= s < req + h] == list(range(req, req + h))


def test_realtime_open_loop_serves_a_fast_reply_in_the_same_tick() -> None:
    """A reply within the tick's wait budget is executed at once: no held tick per chunk."""
    h, steps = 5, 40
    src = FakeSource(h, 2, delay=0)
    ex = ChunkExecutor(src, h, "open_loop", wait_when_empty=False, tick_wait_s=0.01)
    executed = [ex.act({}, t, 0) for t in range(steps)]
    assert all(a is not None for a in executed) and ex.stats.empty == 0
    assert src.requests == list(range(0, steps, h))
    without = ChunkExecutor(FakeSource(h, 2, delay=0), h, "open_loop", wait_when_empty=False)
    assert sum(without.act({}, t, 0) is None for t in range(steps)) > 0  # the hold this removes


def test_open_loop_with_lockstep_runner_requests_every_h_steps() -> None:
    src = FakeSource(4, 2)
    ex = ChunkExecutor(src, 4, "open_loop", wait_when_empty=True)
    d = SafeDriver(MockDriver(MockConfig(action_dim=2, max_episode_steps=20, success_radius=0.0)))
    r = run_episode(d, ex, 0, 0)
    assert r.steps == 20 and src.requests == [0, 4, 8, 12, 16] and r.held == 0


def test_latency_aware_drops_stale_actions_and_measures_delay() -> None:
    h, delay = 8, 3
    src = FakeSource(h, 1, delay)
    ex = ChunkExecutor(src, h, "latency_aware", threshold=0.25)
    executed: dict[int, float] = {}
    for t in range(60):
        src.now = t
        a = ex.act({}, t, 0)
        if a is not None:
            executed[t] = float(a[0])
    assert ex.delay_steps == delay
    assert all(round(v * 1000) == t for t, v in executed.items()), "an action ran at a step it was not planned for"
    assert ex.stats.dropped_stale >= delay  # the first chunk's first `delay` actions were stale
    # once the delay is measured, requests go out early enough that the queue never runs dry
    assert all(t in executed for t in range(30, 60))


def test_executor_reset_forgets_inflight_request() -> None:
    src = FakeSource(4, 1, delay=5)
    ex = ChunkExecutor(src, 4, "open_loop")
    assert ex.act({}, 0, 0) is None and len(src.requests) == 1
    ex.reset()
    src.now = 10
    assert ex.act({}, 0, 1) is None and len(src.requests) == 2  # a new request for the new episode


# -- end to end with a server ----------------------------------------------------------------------


@pytest.fixture
def server():
    from qc_robot.policies.scripted import RandomPolicy, simple_spec
    from qc_robot.server.app import ControlServer

    made = []

    def start(obs_dim: int, logger=None):
        s = ControlServer(RandomPolicy(simple_spec(obs_dim, 5, 5), scale=0.3), "tcp://127.0.0.1:*",
                          episode_logger=logger).start()
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


def test_sim_driver_runs_an_ogbench_episode_against_the_server(server, capsys) -> None:
    srv = server(37)
    cfg = DriveConfig(driver="sim", env=EnvConfig("cube-double-task2", max_episode_steps=40), server=srv.address,
                      episodes=1, time_scale=8.0, latency_ms=20.0, obs_noise=0.001, mode="latency_aware")
    assert run_drive(cfg) == 0
    out = capsys.readouterr().out
    assert "episode 1/1" in out and "(robot 40)" in out and "success 0/1" in out
    assert srv.stats.chunks >= 8 and not srv.stats.errors


def test_served_episodes_are_logged_to_hdf5(server, tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    from qc_robot.server.episode_log import EpisodeLogger

    srv = server(10, EpisodeLogger(str(tmp_path), {"source": "test"}))
    cfg = DriveConfig(driver="mock", server=srv.address, episodes=2, driver_args={"max_episode_steps": 12})
    assert run_drive(cfg) == 0
    srv.stop()  # flushes the logger
    with h5py.File(srv.logger.path, "r") as f:
        demos = sorted(f["data"])
        assert demos == ["demo_0", "demo_1"]
        g = f["data/demo_0"]
        assert g.attrs["num_samples"] == 12 and g["actions"].shape == (12, 5)
        assert g["obs/state"].shape == g["next_obs/state"].shape == (12, 10)
        np.testing.assert_array_equal(g["obs/state"][1:], g["next_obs/state"][:-1])


def test_drive_and_serve_configs_compose() -> None:
    from qc_robot.cli import compose

    cfg = compose("drive", ["driver=mock", "env=cube-double-task2", "episodes=3", "safety.max_delta=[0.2]"])
    assert isinstance(cfg, DriveConfig) and cfg.env.name == "cube-double-task2" and cfg.safety.max_delta == [0.2]
    serve = compose("serve", ["policy=hold:37:5:5"])
    assert serve.bind == "tcp://127.0.0.1:5555" and serve.policy == "hold:37:5:5"
