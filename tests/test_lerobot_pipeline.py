"""A policy trained on a LeRobot arm's own teleop recording, end to end (issue 14): record with the
SO-101 leader driving the follower -> train offline on that file -> export -> serve -> drive the
follower. Only the serial wire is simulated (tests/feetech_sim.py), as in tests/test_lerobot.py.

The follower runs at 30 Hz here, not the sim tasks' 20 Hz, so the exported file must carry the
rate the data was recorded at."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from lerobot_env import require_lerobot_arms

require_lerobot_arms()

from lerobot_rig import RANGES, calibrated_so101  # noqa: E402

HZ = 30.0


def _record(out: Path, cal: Path, episodes: int) -> None:
    from qc_robot.data.recorder import Recorder
    from qc_robot.teleop.config import TeleopConfig
    from qc_robot.teleop.devices import Event, MergedDevice, TeleopCommand, TeleopDevice
    from qc_robot.teleop.session import TeleopSession, build_device, build_driver, env_args_for

    with contextlib.ExitStack() as stack:
        fsim, fargs = calibrated_so101("follower", cal / "f")
        lsim, largs = calibrated_so101("leader", cal / "l")
        stack.callback(fsim.close)
        stack.callback(lsim.close)
        cfg = TeleopConfig(driver="lerobot", device="lerobot", out=str(out), episodes=episodes, time_scale=10.0,
                           status=False, driver_args={"robot_args": fargs, "control_hz": HZ},
                           device_args={"teleop_type": "so101_leader", "teleop_args": largs})
        driver = build_driver(cfg)
        leader = build_device(cfg, driver)

        class Hand(TeleopDevice):
            """The operator: starts an episode, sweeps the leader's elbow up and down, ends it."""

            def __init__(self) -> None:
                self.reads = 0

            def read(self) -> TeleopCommand:
                self.reads += 1
                i = self.reads % 30
                lsim.move(3, 2048 + 30 * (i if i < 15 else 30 - i))
                return TeleopCommand(None, [Event.START] if i == 1 else [Event.SUCCESS] if i == 0 else [])

        driver.connect()
        stack.callback(driver.close)
        with Recorder(cfg.out, env_args_for(cfg, driver)) as rec, MergedDevice(leader, Hand()) as dev:
            res = TeleopSession(driver, dev, rec, episodes=episodes, time_scale=cfg.time_scale).run()
        assert res.labels == ["success"] * episodes


def test_a_policy_trained_on_a_lerobot_recording_serves_the_follower(tmp_path: Path, capsys) -> None:
    from qc_robot.cli import compose
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import run_drive
    from qc_robot.drivers.safety import SafetyConfig
    from qc_robot.export.onnx_export import run_export
    from qc_robot.policies.onnx_policy import OnnxPolicy
    from qc_robot.server.app import ControlServer
    from qc_robot.train.checkpoint import load_checkpoint
    from qc_robot.train.learner import CHECKPOINT, train

    data = tmp_path / "so101.hdf5"
    _record(data, tmp_path / "cal", episodes=2)
    run = tmp_path / "run"
    train(compose("train", ["experiment=smoke", "agent=qc_fql", f"data.path={data}", f"training.run_dir={run}",
                            "training.offline_steps=20", "training.online_steps=0", "training.eval_episodes=0"]))
    ckpt = load_checkpoint(run / CHECKPOINT)
    assert ckpt.control_hz == HZ and ckpt.agent.obs_dim == 6 and ckpt.agent.act_dim == 6
    model = tmp_path / "model.onnx"
    assert run_export(compose("export", [f"checkpoint={run / CHECKPOINT}", f"out={model}"])) == 0
    policy = OnnxPolicy(model, threads=1)
    assert policy.spec.control_hz == HZ and [f.key for f in policy.spec.obs_fields] == ["state"]

    sim, args = calibrated_so101("follower", tmp_path / "cal2")
    srv = ControlServer(policy, "tcp://127.0.0.1:*").start()
    try:
        cfg = DriveConfig(driver="lerobot", server=srv.address, episodes=1, time_scale=4.0,
                          safety=SafetyConfig(max_delta=[0.2]),
                          driver_args={"robot_args": args, "max_episode_steps": 20, "control_hz": HZ})
        assert run_drive(cfg) == 0
    finally:
        srv.stop()
        sim.close()
    out = capsys.readouterr().out
    assert "episode 1/1" in out and "steps 20" in out and srv.stats.chunks >= 4 and not srv.stats.errors
    goals = [int.from_bytes(d, "little") for addr, d in sim.writes(3) if addr == 42]  # the elbow's goal register
    lo, hi = RANGES[3]
    assert len(goals) >= 20 and all(lo <= g <= hi for g in goals)
    assert np.ptp(goals) > 0  # the served chunks moved the arm
