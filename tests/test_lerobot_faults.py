"""driver=lerobot under faults, on LeRobot's real SO-101 classes over the simulated Feetech bus.

One test per defect of issue 23, each failing on the code before it: failed reads mid-episode
(held rows, the episode and not the run ends), the bus dying during a watchdog stop, an exception
and a SIGTERM during an episode (stop, park, release; the original error reported), a blocked
joint (the target clamped to the measured pose), the speed-cap refusal and the typo refusal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lerobot_env import require_lerobot_arms

require_lerobot_arms()

from episode_rig import TickClock, run_scripted  # noqa: E402
from feetech_sim import FeetechBusSim  # noqa: E402
from lerobot_rig import IDS, RANGES, calibrated_so101  # noqa: E402

from qc_robot.drivers.base import SensorError  # noqa: E402
from qc_robot.drivers.lerobot_driver import LeRobotDriver  # noqa: E402
from qc_robot.drivers.registry import build_driver_config, make_driver  # noqa: E402
from qc_robot.drivers.safety import SafeDriver, SafetyConfig  # noqa: E402

TORQUE_LIMIT = 48  # STS3215 RAM register


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[FeetechBusSim, dict]]:
    sim, args = calibrated_so101("follower", tmp_path / "cal")
    try:
        yield sim, args
    finally:
        sim.close()


def _driver(args: dict, **driver_args: object) -> LeRobotDriver:
    d = make_driver("lerobot", build_driver_config("lerobot", {}, {"robot_args": args, **driver_args}))
    assert isinstance(d, LeRobotDriver)
    return d


def _ticks(a: float, servo_id: int) -> int:
    lo, hi = RANGES[servo_id]
    return int(lo + (a + 1) / 2 * (hi - lo))


def test_failed_reads_hold_and_flag_the_rows_then_the_budget_ends_the_episode_not_the_run(rig) -> None:
    sim, args = rig
    safe = SafeDriver(_driver(args, max_episode_steps=40), SafetyConfig(watchdog_s=1e9))
    push = np.array([0.2, 0, 0, 0, 0, 0], np.float32)  # 0.01 of the range a tick: never at the end
    with safe:
        # one failed read at tick 5: the next tick holds (nothing reaches the motors) and says so
        seen: list[int] = []

        def glitch(rows: list) -> None:
            seen.extend(r.step for r in rows)
            sim.corrupt = len(seen) == 5

        res, rows = run_scripted(safe, lambda step: push, on_rows=glitch)
        assert safe.stats.sensor_faults == 1 and safe.stats.sensor_holds == 1
        held = [r.step for r in rows if r.held]
        assert held == [6], "the tick after the failed read holds, and only that one"
        np.testing.assert_array_equal(rows[6].action, np.zeros(6))
        assert res.robot_held == 1 and res.steps == 40 and safe.end_reason is None

        # the bus stays bad: the budget (max_io_errors=5 consecutive failures) ends this episode
        def dies(rows: list) -> None:
            sim.corrupt = rows[-1].step >= 3

        res, rows = run_scripted(safe, lambda step: push, on_rows=dies)
        assert res.steps < 40 and rows[-1].truncated
        assert safe.end_reason is not None and "max_io_errors=5" in safe.end_reason
        assert safe.step_info().truncated
        goal_before = sim.goal(1)
        sim.corrupt = False
        # ... and not the run: the next episode starts and runs to its end
        res, rows = run_scripted(safe, lambda step: push)
        assert res.steps == 40 and not rows[-1].terminated and rows[-1].truncated and safe.end_reason is None
        assert sim.goal(1) > goal_before


@pytest.mark.parametrize("torque_off", [False, True])
def test_the_bus_dying_during_a_watchdog_stop_ends_the_episode_and_close_does_not_raise(rig, torque_off) -> None:
    sim, args = rig
    clock = TickClock(0.2)
    safe = SafeDriver(_driver(args, max_episode_steps=40, stop_torque_off=torque_off),
                      SafetyConfig(watchdog_s=0.5, on_timeout="stop"), clock=clock)
    with safe:  # __exit__ closes on a dead bus: must not raise

        def script(step: int) -> np.ndarray | None:
            if step == 5:  # the tick the watchdog trips (1.2 s - 0.6 s > 0.5 s): the adapter is unplugged
                sim.dead = True
            return np.full(6, 0.2, np.float32) if step < 3 else None

        res, rows = run_scripted(safe, script, clock=clock)
        assert res.steps == 6 and safe.end_reason is not None and safe.end_reason.startswith("watchdog stop")
        assert safe.stats.trips == 1
    assert not safe.driver.robot.is_connected  # the port was released all the same


def _present_at(sim: FeetechBusSim, pose: list[float]) -> bool:
    return all(abs(sim.goal(s) - _ticks(p, s)) <= 2 for s, p in zip(IDS, pose, strict=True))


def test_an_exception_mid_episode_stops_parks_and_keeps_torque_and_is_the_error_reported(rig) -> None:
    sim, args = rig
    park = [0.0, -0.5, 0.5, 0.0, 0.0, 0.0]
    safe = SafeDriver(_driver(args, park=park, reset_s=0.1))
    with pytest.raises(RuntimeError, match="policy crashed"), safe:
        safe.reset(0)
        for _ in range(5):
            safe.get_observation()
            safe.act(np.full(6, 0.5, np.float32))
        raise RuntimeError("policy crashed")
    assert _present_at(sim, park), "close parks the arm"
    assert all(sim.torque(s) for s in IDS), "an SO-101 falls without torque: it stays on by default"
    assert not safe.driver.robot.is_connected
    limits = [int.from_bytes(d, "little") for a, d in sim.writes(6) if a == TORQUE_LIMIT]
    assert limits[0] == 500 and limits[-1] == 1000, "the gripper's torque limit is set, then restored"


def test_the_original_error_is_reported_when_close_meets_a_dead_bus(rig) -> None:
    sim, args = rig
    safe = SafeDriver(_driver(args, park=[0.0] * 6, release_torque=True))
    with pytest.raises(RuntimeError, match="policy crashed"), safe:
        safe.reset(0)
        sim.dead = True
        raise RuntimeError("policy crashed")  # not the ConnectionError of the torque-off on close
    assert not safe.driver.robot.is_connected


def test_release_torque_switches_torque_off_only_after_the_park(rig) -> None:
    sim, args = rig
    park = [0.0, -0.5, 0.5, 0.0, 0.0, 0.0]
    d = _driver(args, park=park, reset_s=0.1, release_torque=True)
    with d:
        d.reset(0)
    assert _present_at(sim, park) and not any(sim.torque(s) for s in IDS)
    writes = sim.writes(2)
    last_goal = max(i for i, (a, _) in enumerate(writes) if a == 42)
    torque_off = [i for i, (a, data) in enumerate(writes) if a == 40 and data[:1] == b"\x00"]
    assert torque_off and torque_off[-1] > last_goal


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from lerobot_env import torchvision_python
torchvision_python()  # as in this process: LeRobot 0.4 imports torchvision with its robot classes
from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.drive import run_drive
kw = json.loads(sys.argv[1])
print("rc", run_drive(DriveConfig(**kw)), flush=True)
"""


def test_sigterm_during_an_episode_parks_the_arm_and_exits_cleanly(rig, tmp_path: Path) -> None:
    """``qc-robot drive`` stopped by SIGTERM (kill, systemd, docker stop) runs its ``finally``:
    the arm is parked and released as on Ctrl-C (before, Python died on the spot)."""
    from qc_robot.policies.scripted import RandomPolicy, simple_spec
    from qc_robot.server.app import ControlServer

    sim, args = rig
    park = [0.0, -0.5, 0.5, 0.0, 0.0, 0.0]
    srv = ControlServer(RandomPolicy(simple_spec(6, 6, 5, control_hz=20.0), scale=0.3), "tcp://127.0.0.1:*").start()
    proc = None
    try:
        kw = {"driver": "lerobot", "server": srv.address, "episodes": 1000, "time_scale": 4.0,
              "driver_args": {"robot_args": args, "max_episode_steps": 100_000, "park": park, "reset_s": 0.1}}
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(kw), str(Path(__file__).parent)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        deadline = time.monotonic() + 120  # hang guard (start-up imports LeRobot and torch)
        while srv.stats.chunks < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and srv.stats.chunks >= 3, "the episode did not start"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        srv.stop()
    assert proc.returncode == 0, out
    assert "interrupted" in out and "rc 0" in out, out
    assert _present_at(sim, park), "the arm was parked on the way out"
    assert all(sim.torque(s) for s in IDS)


def test_a_blocked_joint_does_not_wind_its_target_up(rig) -> None:
    """A gripper closed on an object: the measured pose stops, the target stays within one step
    of it (it used to run on to the joint limit and stall the servo at full torque)."""
    sim, args = rig
    d = _driver(args, max_step=0.05)
    with d:
        d.reset(0)
        obstacle = sim.present(6) + 100  # absolute ticks (offset 0 on the gripper)
        sim.block(6, 0, obstacle)
        step_ticks = 0.05 / 2 * (RANGES[6][1] - RANGES[6][0])
        for _ in range(40):
            d.get_observation()
            d.send_action([0, 0, 0, 0, 0, 1.0])  # keep closing
            assert sim.goal(6) <= obstacle + 1.05 * step_ticks + 1
        assert sim.present(6) == obstacle
        d.get_observation()
        d.send_action(np.zeros(6))  # the hold keeps the target where it is: no creep either way
        assert sim.goal(6) <= obstacle + 1.05 * step_ticks + 1
    limits = [int.from_bytes(data, "little") for a, data in sim.writes(6) if a == TORQUE_LIMIT]
    assert limits[0] == 500, "the gripper's torque is limited while it squeezes"


def test_relative_target_cap_is_set_and_a_faster_step_is_refused(rig) -> None:
    sim, args = rig
    d = _driver(args)
    cap = d.robot.config.max_relative_target
    assert isinstance(cap, dict) and cap["shoulder_pan"] == pytest.approx(0.2 * 100)  # 10 % of the travel
    assert cap["gripper"] == pytest.approx(0.2 * 50)
    with pytest.raises(ValueError, match="max_step 0.3 per step exceeds the relative-target cap"):
        _driver(args, max_step=0.3)
    user = _driver({**args, "max_relative_target": 5}, max_step=0.02)  # LeRobot units, an int
    assert user.robot.config.max_relative_target["elbow_flex"] == 5.0  # made a float LeRobot 0.3.3 accepts
    with pytest.raises(ValueError, match="release_torque"):
        _driver({**args, "disable_torque_on_disconnect": False})


def test_a_misspelt_driver_arg_is_refused_naming_the_nearest_key(rig, capsys) -> None:
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import run_drive

    _, args = rig
    with pytest.raises(ValueError, match=r"no option driver_args.max_episod_steps: did you mean 'max_episode_steps'\?"):
        build_driver_config("lerobot", {}, {"robot_args": args, "max_episod_steps": 7})
    rc = run_drive(DriveConfig(driver="lerobot", server="tcp://127.0.0.1:9", connect_timeout_s=0.5,
                               driver_args={"robot_args": args, "stop_torqe_off": True}))
    out = capsys.readouterr().out
    assert rc == 2 and "did you mean 'stop_torque_off'?" in out and len(out.strip().splitlines()) == 1


def test_an_arm_left_alone_ends_its_episode_at_the_stated_default_limit(rig) -> None:
    """drive passes max_episode_steps=0 when the env sets none: the arm's own default applies
    (30 s of ticks, issue 22), not an 83-minute episode; negative disables it."""
    from qc_robot.drivers.base import ARM_EPISODE_S

    sim, args = rig
    common = {"max_episode_steps": 0, "env": "cube-single", "realtime": False}  # what drive passes
    slow = make_driver("lerobot", build_driver_config("lerobot", common, {"robot_args": args, "control_hz": 1.0}))
    assert slow.spec.max_episode_steps == round(ARM_EPISODE_S * 1.0)
    with SafeDriver(slow, SafetyConfig(watchdog_s=1e9)) as safe:
        res, rows = run_scripted(safe, lambda step: np.zeros(6, np.float32), max_steps=10_000)
    assert res.steps == round(ARM_EPISODE_S) and rows[-1].truncated and not rows[-1].terminated
    unlimited = build_driver_config("lerobot", common, {"robot_args": args, "max_episode_steps": -1})
    assert make_driver("lerobot", unlimited).spec.max_episode_steps == 0


def test_a_reply_that_arrives_after_its_read_timed_out_is_not_the_next_reading(rig) -> None:
    """A stalled adapter or host: the servos' replies land after the SDK gave up on them. The SDK
    flushes only its output before a request, so the next read used to take the late replies as
    its answer and every reading after was one request old (CI saw commands clipped against them)."""
    sim, args = rig
    d = _driver(args)
    with d:
        d.reset(0)
        before = d.get_observation()["state"]
        sim.delay_replies()
        with pytest.raises(SensorError):
            d.get_observation()
        assert sim.replies_held() and sim.send_late_replies() > 0
        moved = sim.present(6) + 200  # the gripper pushed open: the next reading must show it
        sim.block(6, moved, moved)
        after = d.get_observation()["state"]
        assert after[5] > before[5] + 0.1, (before, after)
        np.testing.assert_allclose(d.get_observation()["state"], after, atol=1e-6)


def test_a_packet_lost_while_lerobot_configures_the_arm_costs_one_more_connect(rig) -> None:
    """One write of LeRobot's motor configuration lost on the wire (CI saw 'Failed to write
    Acceleration ... no status packet' end a drive before its first step): connect tries once more."""
    sim, args = rig
    acceleration = 41  # STS3215 register LeRobot's configure writes on every motor
    sim.lose_writes(acceleration, 1)
    with _driver(args) as d:
        assert d.robot.is_connected and d.get_observation()["state"].shape == (6,)
    assert all(any(a == acceleration for a, _ in sim.writes(i)) for i in IDS)
    sim.lose_writes(acceleration, 2)  # lost again on the second try: the error, not a loop
    with pytest.raises(ConnectionError, match="Acceleration"):
        _driver(args).connect()
