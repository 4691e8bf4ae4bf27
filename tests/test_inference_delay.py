"""Acting under inference delay: pipelined requests, the lockstep delay knob, ``serve delay_ms``.

Real control servers on loopback TCP, the shipped ONNX policy (QC-FQL, H = 5) under onnxruntime,
the MuJoCo sim driver in lockstep. A delay of d = 3 control steps at H = 5 is the regime where one
request in flight leaves a held tick after every two fresh ones (docs/rtc.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pytest

from qc_robot import protocol as P
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.drive import build_driver
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.runner import run_episode
from qc_robot.drivers.simclock import DelayedPolicySource, StepDelayedSource
from qc_robot.server.app import ControlServer
from qc_robot.server.scheduler import FairScheduler
from qc_robot.server.serve import load_policy


@dataclass
class Run:
    actions: np.ndarray  # (T, A) applied
    held: list[bool]
    delays: list[int]
    frozen: int
    inflight_max: int


def _lockstep(mode: str, inflight: int, delay: int, steps: int = 45, policy_seed: int = 7, seed: int = 100) -> Run:
    """`serve seed=policy_seed` + `drive realtime=false inference_delay_steps=delay max_inflight=inflight`."""
    server = ControlServer(load_policy("default", seed=policy_seed), "tcp://127.0.0.1:*").start()
    driver = build_driver(DriveConfig(driver="sim", server=server.address, realtime=False, seed=seed))
    client = PolicyClient(server.address, driver.spec.hello("sim", {"mode": mode}))
    rows: list = []
    try:
        driver.connect()
        welcome = client.connect(20.0)
        assert welcome.chunk_len == 5
        source = StepDelayedSource(client, delay, lambda: driver.step_info().step, 30.0)
        ex = ChunkExecutor(source, welcome.chunk_len, mode, 0.5, 30.0, max_inflight=min(inflight, client.max_inflight))
        most = [0]
        act = ex.act

        def counting_act(obs, step, episode_id):  # the in-flight count each tick leaves behind
            out = act(obs, step, episode_id)
            most[0] = max(most[0], ex.inflight)
            return out

        ex.act = counting_act  # type: ignore[method-assign]
        run_episode(driver, ex, 0, seed, None, client, False, max_steps=steps, on_rows=rows.extend)
    finally:
        client.close()
        driver.close()
        server.stop()
    return Run(np.stack([r.action for r in rows]), [r.held for r in rows], list(ex.stats.delay_steps),
               ex.stats.frozen, most[0])


@pytest.mark.parametrize("mode", ["latency_aware", "rtc"])
def test_pipelining_keeps_every_tick_fresh_at_a_delay_of_3_with_h_5(mode: str) -> None:
    piped = _lockstep(mode, inflight=4, delay=3)
    assert set(piped.delays) == {3}, "the knob's delay is what the executor measures"
    assert not any(piped.held[3:]), f"held ticks after the first reply: {np.flatnonzero(piped.held)}"
    assert 2 <= piped.inflight_max <= 4
    single = _lockstep(mode, inflight=1, delay=3)
    assert sum(single.held[3:]) >= (len(single.held) - 3) // 3 - 1, "one in flight must hold every third tick"
    if mode == "rtc":  # the server continued the newest chunk asked for: its frozen prefix came back
        assert piped.frozen > 0


def test_the_delay_knob_is_deterministic() -> None:
    a = _lockstep("rtc", inflight=4, delay=3, steps=30)
    b = _lockstep("rtc", inflight=4, delay=3, steps=30)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.held == b.held and a.delays == b.delays
    c = _lockstep("rtc", inflight=4, delay=2, steps=30)  # the delay is what changes them
    assert set(c.delays) == {2} and not np.array_equal(a.actions, c.actions)


def test_serve_delay_ms_holds_every_reply_and_queues_a_pipeline_in_order() -> None:
    policy = load_policy("hold:28:5:5")
    with ControlServer(policy, "tcp://127.0.0.1:*", delay_ms=150.0, max_inflight=4) as server:
        client = PolicyClient(server.address, _hello())
        try:
            welcome = client.connect(20.0)
            assert client.max_inflight == 4 and welcome.metadata["max_inflight"] == 4
            obs = {"state": np.zeros(28, np.float32)}
            sent = time.monotonic()
            rids = [client.request(obs, 0, step) for step in range(3)]  # three in flight at once
            assert None not in rids
            got: list[P.Chunk | P.Error] = []
            deadline = time.monotonic() + 60
            while len(got) < 3 and time.monotonic() < deadline:
                reply = client.poll(0.5)
                if reply is not None:
                    got.append(reply)
            first = time.monotonic() - sent
        finally:
            client.close()
    assert [type(g) for g in got] == [P.Chunk] * 3, got  # none superseded
    assert [g.request_id for g in got] == rids and [g.start_step for g in got] == [0, 1, 2]  # in order
    assert first >= 0.15, "a reply left before the injected delay"  # a lower bound: load only adds to it


def _hello() -> P.Hello:
    from qc_robot.drivers.mock import MockConfig, MockDriver

    return MockDriver(MockConfig(obs_dim=28, action_dim=5)).spec.hello("mock")


def test_the_server_queues_max_inflight_per_driver_and_supersedes_the_oldest_beyond() -> None:
    sched: FairScheduler[str, int] = FairScheduler(depth=3)
    assert [sched.put("a", i) for i in range(3)] == [None, None, None]
    assert sched.put("a", 3) == 0  # the oldest queued goes
    assert [sched.get(), sched.charge("a", 1.0), sched.get()] == [("a", 1), None, ("a", 2)]
    sched.charge("a", 1.0)
    assert sched.drop("a") == [3] and len(sched) == 0


def test_no_mode_keeps_up_when_the_delay_reaches_h_and_the_executor_says_what_to_change(caplog) -> None:
    policy = load_policy("hold:28:5:5")
    clock = [0]
    ex = ChunkExecutor(DelayedPolicySource(policy, 6, lambda: clock[0]), 5, "latency_aware", max_inflight=4)
    with caplog.at_level(logging.WARNING, logger="qc_robot.executor"):
        held = 0
        for step in range(60):
            clock[0] = step
            held += ex.act({"state": np.zeros(28, np.float32)}, step, 0) is None
    assert held == 60 and ex.stats.behind > 0
    said = [r.getMessage() for r in caplog.records if "chunk length" in r.getMessage()]
    assert len(said) == 1 and "longer chunk" in said[0] and "GPU" in said[0] and "mode=open_loop" in said[0]


def test_drive_reports_the_delay_it_met(capsys) -> None:
    from qc_robot.cli import main

    with ControlServer(load_policy("default", seed=1), "tcp://127.0.0.1:*") as server:
        code = main(["drive", "driver=sim", f"server={server.address}", "realtime=false", "episodes=1",
                     "max_steps=20", "mode=rtc", "inference_delay_steps=3", "connect_timeout_s=20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "inference delay: p50 3, max 3 control steps (H=5; mode rtc, at most 4 request(s) in flight)" in out, out
    assert "held 3 of 20" in out, out  # the first reply's wait only: pipelined from then on
