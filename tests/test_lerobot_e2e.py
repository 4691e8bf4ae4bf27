"""LeRobot end to end (issue 27), as a LeRobot user goes: a LeRobotDataset of the SO-101 written by
LeRobot's own writer -> ``qc-robot dataset import`` -> ``train`` -> ``export`` (ONNX) -> served ->
``qc-robot drive driver=lerobot`` on LeRobot's real SO-101 follower class, whose serial port is the
simulated Feetech bus. Runs under whichever LeRobot is installed (0.3.x or 0.4.x).

The arm keeps LeRobot's default units (degrees in 0.4, ±100 range units in 0.3): the demonstrations
fit the rig's calibration in both, except wrist_flex, which sweeps 100..170, beyond its calibrated
±79 degrees (±100 units): whatever the policy asks, that joint's goal must stop at its calibrated end.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from lerobot_env import require_lerobot_arms

require_lerobot_arms()

from lerobot_datasets import FPS, JOINTS, make_dataset  # noqa: E402
from lerobot_rig import IDS, RANGES, calibrated_so101  # noqa: E402

from qc_robot.cli import main  # noqa: E402
from qc_robot.drivers.lerobot_driver import lerobot_config_class  # noqa: E402

CENTER = np.array([0.0, -10.0, 10.0, 135.0, 0.0, 50.0])
AMP = np.array([50.0, 40.0, 40.0, 35.0, 60.0, 40.0])  # wrist_flex: 100..170, past its calibration
WRIST_FLEX = 3
STEPS = 20


def _values(e: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(state, action) in LeRobot units: every joint sweeps, the state one step behind its target."""
    phase = 2 * np.pi * t / 12 + e + np.arange(len(JOINTS))
    return ((CENTER + AMP * np.sin(phase - 0.5)).astype(np.float32),
            (CENTER + AMP * np.sin(phase)).astype(np.float32))


def _ticks(value: float, servo: int, degrees: bool) -> float:
    """LeRobot units -> goal ticks of the rig's calibration (the gripper is always 0..100)."""
    lo, hi = RANGES[servo]
    if servo == 6:
        return lo + value / 100 * (hi - lo)
    return (lo + hi) / 2 + value * 4095 / 360 if degrees else lo + (value + 100) / 200 * (hi - lo)


def _overrides(prefix: str, value: object) -> list[str]:
    """``value`` as dotted command-line overrides, as docs/robots.md writes them (paths quoted)."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in _overrides(f"{prefix}.{k}", v)]
    text = f"[{','.join(map(repr, value))}]" if isinstance(value, list) else \
        f"'{value}'" if isinstance(value, str) else repr(value)
    return [f"{prefix}={text}"]


def test_a_lerobot_dataset_trains_a_policy_that_drives_the_so101(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from qc_robot.policies.onnx_policy import OnnxPolicy
    from qc_robot.server.app import ControlServer

    root = make_dataset(tmp_path / "lerobot", rewards=False, lengths=[14, 14], values=_values)
    h5 = tmp_path / "so101.hdf5"
    assert main(["dataset", "import", str(root), f"out={h5}"]) == 0
    with h5py.File(h5) as f:
        norm = json.loads(f["data"].attrs["env_args"])["normalization"]["action"]
    run, model = tmp_path / "run", tmp_path / "so101.onnx"
    assert main(["train", "experiment=smoke", f"data.path={h5}", f"training.run_dir={run}",
                 "training.offline_steps=3", "training.online_steps=0", "training.eval_episodes=0",
                 "agent.horizon=2"]) == 0
    assert main(["export", f"checkpoint={run / 'checkpoint.pt'}", f"out={model}"]) == 0
    capsys.readouterr()

    sim, args = calibrated_so101("follower", tmp_path / "cal")
    del args["use_degrees"]  # LeRobot's own default
    degrees = lerobot_config_class("robots", "so101_follower").__dataclass_fields__["use_degrees"].default
    srv = ControlServer(OnnxPolicy(model, threads=1, warmup=1), "tcp://127.0.0.1:*").start()
    try:
        driver_args = {"robot_args": args, "action_mode": "absolute", "joint_low": norm["low"],
                       "joint_high": norm["high"], "control_hz": float(FPS), "max_episode_steps": STEPS,
                       "max_relative_target": 0.0}  # goals are the policy's targets, unsmoothed by LeRobot
        assert main(["drive", "driver=lerobot", f"server={srv.address}", "episodes=1", "time_scale=4.0",
                     *_overrides("driver_args", driver_args)]) == 0
    finally:
        srv.stop()
        sim.close()
    out = capsys.readouterr().out
    assert "episode 1/1" in out and f"steps {STEPS}" in out, out
    assert srv.stats.chunks >= STEPS // 2 and not srv.stats.errors
    for j, servo in enumerate(IDS):
        goals = [int.from_bytes(data, "little") for addr, data in sim.writes(servo) if addr == 42]
        assert len(goals) >= STEPS, (JOINTS[j], goals)
        cal_lo, cal_hi = RANGES[servo]
        if j == WRIST_FLEX:  # asked beyond its calibration every step: held at the calibrated end (the
            assert all(cal_hi - 1 <= g <= cal_hi for g in goals[-STEPS:]), str(goals)  # stop: as measured)
            continue
        # inside the calibration, and inside the demonstrations' range (joint order and units held);
        # 2 ticks: the stop re-sends the measured goal, ticks -> units -> ticks, each truncating
        lo = max(cal_lo, _ticks(norm["low"][j], servo, degrees) - 2)
        hi = min(cal_hi, _ticks(norm["high"][j], servo, degrees) + 2)
        assert all(lo <= g <= hi for g in goals[-STEPS:]), f"{JOINTS[j]} {lo} {hi} {goals}"
        assert len(set(goals)) > 1, (JOINTS[j], goals)  # the policy moved it
