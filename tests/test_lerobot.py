"""driver=lerobot and device=lerobot against LeRobot's real SO-101 follower and leader classes.

Only the wire is simulated: the robots get a pseudo-terminal as their serial port, with a
simulated Feetech servo chain on the other end (tests/feetech_sim.py), so LeRobot's bus,
calibration and normalisation code and the Feetech SDK all run as on the real arm. Assertions are
on what reached the motors' registers, in servo ticks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lerobot_env import require_lerobot_arms

require_lerobot_arms()

from feetech_sim import FeetechBusSim  # noqa: E402
from lerobot_rig import IDS, OFFSETS, RANGES, calibrated_so101  # noqa: E402

from qc_robot.drivers.base import IOBudgetSpent, SensorError  # noqa: E402
from qc_robot.drivers.lerobot_driver import (  # noqa: E402
    LeRobotConfig,
    LeRobotDriver,
    lerobot_config_class,
    make_lerobot_robot,
)
from qc_robot.drivers.registry import driver_config, make_driver  # noqa: E402
from qc_robot.drivers.safety import SafeDriver, SafetyConfig  # noqa: E402

JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[tuple[LeRobotDriver, FeetechBusSim]]:
    sim, args = calibrated_so101("follower", tmp_path / "cal")
    d = make_driver("lerobot", driver_config("lerobot", robot_type="so101_follower", robot_args=args,
                                             action_mode="absolute", max_relative_target=0.0))  # jumps allowed
    try:
        d.connect()
        yield d, sim
    finally:
        d.close()
        sim.close()


def _ticks(a: float, servo_id: int) -> int:
    """Goal ticks for normalised command ``a`` on a RANGE_M100_100 / RANGE_0_100 joint: the whole
    calibrated range maps onto [-1, 1] (LeRobot truncates to an int)."""
    lo, hi = RANGES[servo_id]
    return int(lo + (a + 1) / 2 * (hi - lo))


def test_spec_is_mapped_from_the_robots_features(follower) -> None:
    d, _ = follower
    s = d.spec
    assert [f.key for f in s.obs_fields] == ["state"] and s.obs_fields[0].shape == (6,)
    assert s.action_dim == 6 and d.actions.keys == [f"{j}.pos" for j in JOINTS]
    np.testing.assert_array_equal(s.action_low, -np.ones(6))
    np.testing.assert_array_equal(s.action_high, np.ones(6))
    # LeRobot units: body joints -100..100, the gripper 0..100 (the rig's use_degrees=False)
    np.testing.assert_array_equal(d.actions.low, [-100] * 5 + [0])
    np.testing.assert_array_equal(d.actions.high, [100] * 6)
    assert d.realtime and s.hello("lerobot").action_dim == 6


def test_degree_ranges_come_from_the_calibration(tmp_path: Path) -> None:
    sim, args = calibrated_so101("follower", tmp_path)
    try:
        d = LeRobotDriver(LeRobotConfig(robot_args={**args, "use_degrees": True}, normalize=False,
                                        action_mode="absolute"))
        # range (1000, 3000) around its middle, 4095 ticks per turn
        assert d.actions.low[0] == pytest.approx(-1000 * 360 / 4095) and d.actions.high[0] == pytest.approx(1000 * 360 / 4095)
        assert d.actions.low[1] == pytest.approx(-1200 * 360 / 4095)
        np.testing.assert_allclose(d.spec.action_low, d.actions.low.astype(np.float32))
    finally:
        sim.close()


def test_a_joint_range_wider_than_the_calibration_never_reaches_a_motor(tmp_path: Path) -> None:
    """``joint_low``/``joint_high`` (a dataset's range) wider than the calibration: in degrees (LeRobot
    0.4's default) LeRobot itself does not bound a goal, so the driver keeps it inside the calibration."""
    sim, args = calibrated_so101("follower", tmp_path)
    try:
        cfg = LeRobotConfig(robot_args={**args, "use_degrees": True}, action_mode="absolute", max_relative_target=0.0,
                            joint_low=[-170.0] * 5 + [0.0], joint_high=[170.0] * 5 + [100.0])
        with LeRobotDriver(cfg) as d:
            d.reset(0)
            d.send_action(np.ones(6))  # 170 degrees: beyond every calibrated body joint but wrist_roll
            assert [sim.goal(i) for i in IDS[:4]] == [RANGES[i][1] for i in IDS[:4]]
            assert sim.goal(5) == int(170 * 4095 / 360 + 2047.5)  # wrist_roll turns a whole turn: 170 fits
            d.send_action(-np.ones(6))
            assert [sim.goal(i) for i in IDS] == [RANGES[i][0] for i in IDS[:4]] + [sim.goal(5), RANGES[6][0]]
            assert sim.goal(5) == int(-170 * 4095 / 360 + 2047.5)
    finally:
        sim.close()


def test_actions_reach_the_motors_in_ticks(follower) -> None:
    d, sim = follower
    d.reset(0)
    a = np.array([0.5, -0.25, 0.0, 1.0, -1.0, -1.0], np.float32)
    applied = d.send_action(a)
    for i, sid in enumerate(IDS):
        assert sim.goal(sid) == _ticks(float(a[i]), sid), JOINTS[i]
        assert sim.torque(sid)
    np.testing.assert_allclose(applied, a, atol=2e-3)  # what LeRobot sent, read back from its return value
    np.testing.assert_allclose(d.get_observation()["state"], a, atol=2e-3)  # the servos got there
    # the homing offset is the servo's: the shaft of joint 2 sits offset ticks from its goal register
    assert sim.actual(2) == sim.goal(2) + OFFSETS[2]


def test_delta_mode_steps_each_target_by_at_most_max_step(tmp_path: Path) -> None:
    sim, args = calibrated_so101("follower", tmp_path)
    d = LeRobotDriver(LeRobotConfig(robot_args=args, max_step=0.1))  # the default mode: delta
    try:
        d.reset(0)
        assert not d.absolute_actions and np.array_equal(d.hold_action(), np.zeros(6))
        start = [sim.goal(s) for s in IDS]
        applied = d.send_action([1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
        for i, sid in enumerate(IDS):  # a unit step = 0.1 of the [-1, 1] range = 5 % of the travel
            lo, hi = RANGES[sid]
            expected = [1.0, -1.0, 0.5, 0.0, 0.0, 0.0][i] * 0.05 * (hi - lo)
            assert abs(sim.goal(sid) - start[i] - expected) <= 1.5, JOINTS[i]
        np.testing.assert_allclose(applied, [1.0, -1.0, 0.5, 0.0, 0.0, 0.0], atol=0.02)
        goals = [sim.goal(s) for s in IDS]
        d.send_action(np.zeros(6))  # the hold: the goals stay
        assert [sim.goal(s) for s in IDS] == goals
        for _ in range(25):  # run joint 1 into its upper end: the step actually taken shrinks to 0
            d.get_observation()  # as the control loop does every tick: the anchor of the next target
            applied = d.send_action([1.0, 0, 0, 0, 0, 0])
        assert sim.goal(1) == RANGES[1][1] and applied[0] == pytest.approx(0.0, abs=1e-6)
    finally:
        d.close()
        sim.close()


def test_safety_layer_keeps_commands_inside_the_calibrated_range(follower) -> None:
    d, sim = follower
    safe = SafeDriver(d, SafetyConfig(max_delta=[0.1]))
    safe.reset(0)
    start = d.hold_action()
    for _ in range(30):
        safe.act(np.full(6, 7.0))
        assert all(RANGES[s][0] <= sim.goal(s) <= RANGES[s][1] for s in IDS)
    assert all(sim.goal(s) == RANGES[s][1] for s in IDS)  # reached the top, never beyond
    assert safe.stats.clipped == 30 and safe.stats.delta_limited > 0
    safe.act([np.nan] * 6)  # rejected: the motors keep their goal
    assert all(sim.goal(s) == RANGES[s][1] for s in IDS) and safe.stats.rejected == 1
    assert not np.allclose(start, d.hold_action())


def test_watchdog_hold_keeps_the_last_goal(follower) -> None:
    d, sim = follower
    t = [0.0]
    safe = SafeDriver(d, SafetyConfig(watchdog_s=0.5), clock=lambda: t[0])
    safe.reset(0)
    safe.act(np.full(6, 0.3))
    goals = [sim.goal(s) for s in IDS]
    for k in range(1, 20):  # the policy went silent for 2 s
        t[0] = 0.1 * k
        safe.act(None)
    assert safe.tripped and [sim.goal(s) for s in IDS] == goals


def test_reset_moves_home_smoothly(tmp_path: Path) -> None:
    sim, args = calibrated_so101("follower", tmp_path)
    home = [0.0, 0.2, -0.2, 0.0, 0.0, 0.5]
    d = LeRobotDriver(LeRobotConfig(robot_args=args, home=home, reset_s=0.2, control_hz=50.0, action_mode="absolute",
                                    max_relative_target=0.5))  # steps of 0.13 < half the cap: reset_s sets the pace
    try:
        d.connect()
        d.send_action(np.full(6, -0.8))
        n0 = len(sim.writes(1))
        obs = d.reset(0)
        np.testing.assert_allclose(obs["state"], home, atol=2e-3)
        goals = [int.from_bytes(data, "little") for addr, data in sim.writes(1)[n0:] if addr == 42]
        assert len(goals) == 10 and all(np.diff(goals) > 0)  # 0.2 s at 50 Hz, monotone, no jump
    finally:
        d.close()
        sim.close()


def test_uncalibrated_arm_is_refused_with_the_calibration_command(tmp_path: Path) -> None:
    with FeetechBusSim(IDS) as sim:  # motors never calibrated, no calibration file
        with pytest.raises(ValueError, match="lerobot-calibrate"):
            LeRobotDriver(LeRobotConfig(robot_args={"port": sim.port, "id": "new", "calibration_dir": str(tmp_path)}))
    sim, args = calibrated_so101("follower", tmp_path / "a")
    try:  # the file exists but the motors hold another calibration (e.g. swapped arm)
        sim.poke(3, 9, (1234).to_bytes(2, "little"))  # Min_Position_Limit
        d = LeRobotDriver(LeRobotConfig(robot_args=args))
        with pytest.raises(RuntimeError, match="lerobot-calibrate"):
            d.connect()
        assert not d.robot.is_connected
    finally:
        sim.close()


def test_unknown_robot_type_and_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="so101_follower"):  # the message lists the known types
        make_lerobot_robot("so999_follower", {})
    with pytest.raises(ValueError, match="bad arguments"):
        make_lerobot_robot("so101_follower", {"port": "/dev/null", "no_such_field": 1})


def test_names_that_differ_between_lerobot_releases_point_at_the_one_installed() -> None:
    """0.4 renamed the bimanual SO arm (bi_so100_follower -> bi_so_follower) and put the SO arms in a
    module ``so_follower`` that is no config type: the error names what this release calls it."""
    known = lerobot_config_class("robots", "so101_follower").get_known_choices()
    ours, other = ("bi_so_follower", "bi_so100_follower") if "bi_so_follower" in known else \
        ("bi_so100_follower", "bi_so_follower")
    with pytest.raises(ValueError, match=f"unknown LeRobot type '{other}' \\(did you mean '{ours}'\\?\\)"):
        make_lerobot_robot(other, {})
    with pytest.raises(ValueError, match="did you mean 'so101_follower'"):
        make_lerobot_robot("so_follower", {})


def test_a_calibration_in_lerobot_0_3s_default_folder_is_found(tmp_path: Path, monkeypatch) -> None:
    """LeRobot's default calibration folder is named after the robot class: ``so101_follower`` in
    0.3, ``so_follower`` in 0.4. A calibration made under 0.3 is still found (its home redirected here)."""
    import lerobot.robots.robot as robot_module

    monkeypatch.setattr(robot_module, "HF_LEROBOT_CALIBRATION", tmp_path)
    sim, args = calibrated_so101("follower", tmp_path / "robots" / "so101_follower")
    try:
        del args["calibration_dir"]
        with LeRobotDriver(LeRobotConfig(robot_args=args)) as d:
            assert d.robot.calibration_fpath == tmp_path / "robots" / "so101_follower" / "rig.json"
            assert d.robot.is_connected and d.robot.is_calibrated
    finally:
        sim.close()


def test_a_failed_read_is_a_sensor_error_never_the_last_observation(follower) -> None:
    d, sim = follower
    d.reset(0)
    d.send_action(np.full(6, 0.2))
    good = d.get_observation()
    sim.corrupt = True
    for _ in range(d.cfg.max_io_errors):  # each failed read says so: never a silent repeat
        with pytest.raises(SensorError) as e:
            d.get_observation()
        assert not isinstance(e.value, IOBudgetSpent)
    with pytest.raises(IOBudgetSpent, match="max_io_errors=5"):  # the budget: the episode must end
        d.get_observation()
    sim.corrupt = False
    np.testing.assert_allclose(d.get_observation()["state"], good["state"], atol=2e-3)
    assert d.io_errors_total == d.cfg.max_io_errors + 1 and d.io_errors == 0  # each after its retry failed too


def test_leader_arm_teleop_records_through_the_session(tmp_path: Path) -> None:
    """device=lerobot: the SO-101 leader drives the follower through the safety layer at the
    control rate, and the recorder stores what the follower was sent."""
    import h5py

    from qc_robot.data.recorder import Recorder
    from qc_robot.teleop.config import TeleopConfig
    from qc_robot.teleop.devices import Event, MergedDevice, TeleopCommand, TeleopDevice
    from qc_robot.teleop.session import TeleopSession, build_device, build_driver, env_args_for

    with contextlib.ExitStack() as stack:
        fsim, fargs = calibrated_so101("follower", tmp_path / "f")
        lsim, largs = calibrated_so101("leader", tmp_path / "l")
        stack.callback(fsim.close)
        stack.callback(lsim.close)
        cfg = TeleopConfig(driver="lerobot", device="lerobot", out=str(tmp_path / "so101.hdf5"), episodes=1,
                           time_scale=10.0, status=False, driver_args={"robot_args": fargs},
                           device_args={"teleop_type": "so101_leader", "teleop_args": largs})
        driver = build_driver(cfg)
        leader = build_device(cfg, driver)
        assert leader.name in ("lerobot", "lerobot+keyboard")

        class Hand(TeleopDevice):
            """The operator: presses start, sweeps the leader's elbow, ends as a success."""

            def __init__(self) -> None:
                self.reads = 0

            def read(self) -> TeleopCommand:
                self.reads += 1
                lsim.move(3, 2048 + 40 * self.reads)  # torque off: the hand moves the shaft
                return TeleopCommand(None, [Event.START] if self.reads == 1 else
                                     [Event.SUCCESS] if self.reads == 25 else [])

        driver.connect()
        stack.callback(driver.close)
        with Recorder(cfg.out, env_args_for(cfg, driver)) as rec, MergedDevice(leader, Hand()) as dev:
            res = TeleopSession(driver, dev, rec, episodes=1, time_scale=cfg.time_scale).run()
            assert not lsim.torque(3), "a leader arm stays limp"
        assert res.labels == ["success"]
        # delta mode: the follower's elbow follows the leader at most max_step per tick; the sweep
        # (40 ticks of 2200 per tick = 0.036 < 0.05) is slow enough to be followed one tick behind.
        # The hand moved the leader twice more after the last command (that read, the verdict tick).
        assert abs(fsim.present(3) - (lsim.present(3) - 2 * 40)) <= 2
        with h5py.File(cfg.out) as f:
            g = f["data/demo_0"]
            acts, states = g["actions"][:], g["next_obs/state"][:]
        assert acts.shape == (23, 6)
        assert np.all(acts[:, 2] > 0) and np.all(acts[:, 2] <= 1.0)  # catching up at full speed, then
        np.testing.assert_allclose(acts[-10:, 2], 2 * 40 / 2200 / 0.05, atol=0.02)  # tracking the sweep
        assert np.all(np.diff(states[:, 2]) > 0)  # the follower's elbow rose every step
        assert np.abs(acts[:, [0, 1, 3, 4, 5]]).max() < 1e-6  # untouched joints: hold (zeros)


def test_a_served_episode_runs_through_qc_robot_drive(tmp_path: Path, capsys) -> None:
    """The first served episode: ``qc-robot drive driver=lerobot`` against a control server."""
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import run_drive
    from qc_robot.policies.scripted import RandomPolicy, simple_spec
    from qc_robot.server.app import ControlServer

    sim, args = calibrated_so101("follower", tmp_path)
    srv = ControlServer(RandomPolicy(simple_spec(6, 6, 5, control_hz=20.0), scale=0.5), "tcp://127.0.0.1:*").start()
    try:
        cfg = DriveConfig(driver="lerobot", server=srv.address, episodes=1, time_scale=4.0,
                          safety=SafetyConfig(max_delta=[0.2]),
                          driver_args={"robot_args": args, "max_episode_steps": 30})
        assert run_drive(cfg) == 0
    finally:
        srv.stop()
        sim.close()
    out = capsys.readouterr().out
    assert "episode 1/1" in out and "steps 30" in out and srv.stats.chunks >= 6 and not srv.stats.errors
    goals = [int.from_bytes(data, "little") for addr, data in sim.writes(1) if addr == 42]
    lo, hi = RANGES[1]
    assert len(goals) >= 30 and all(lo <= g <= hi for g in goals)
    # delta mode: a target moves at most max_step (0.05 of the [-1, 1] range) per step
    assert np.abs(np.diff(goals)).max() <= 0.025 * (hi - lo) + 1 and np.abs(np.diff(goals)).max() > 0


def test_moving_the_leader_away_from_the_follower_is_a_takeover(tmp_path: Path) -> None:
    """drive operator=lerobot: the operator takes over while the leader is moved beyond
    ``takeover_threshold`` from the follower's measured pose, and hands back when it is not."""
    from qc_robot.drivers.registry import build_driver_config
    from qc_robot.teleop.devices import LeRobotLeaderDevice

    with contextlib.ExitStack() as stack:
        fsim, fargs = calibrated_so101("follower", tmp_path / "f")
        lsim, largs = calibrated_so101("leader", tmp_path / "l")
        stack.callback(fsim.close)
        stack.callback(lsim.close)
        follower = make_driver("lerobot", build_driver_config("lerobot", {}, {"robot_args": fargs, "reset_s": 0.0}))
        follower.connect()
        stack.callback(follower.close)
        follower.reset(0)
        leader = LeRobotLeaderDevice.for_driver(follower, teleop_args=largs, takeover_threshold=0.1)
        leader.open()
        stack.callback(leader.close)
        for servo in IDS:  # the leader in the follower's pose: following, not taking over
            lsim.move(servo, fsim.present(servo))
        assert leader.read().takeover is False
        lsim.move(3, fsim.present(3) + 330)  # 0.3 of joint 3's normalized range (2200 ticks / 2)
        cmd = leader.read()
        assert cmd.takeover is True and cmd.action is not None and cmd.action[2] > 0
        lsim.move(3, fsim.present(3) + 60)  # back within 0.1 (0.055): handed back
        assert leader.read().takeover is False
