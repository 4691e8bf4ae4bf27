"""A calibrated SO-101 arm (follower or leader) on the simulated Feetech bus, for the LeRobot tests.

What ``lerobot-calibrate`` leaves behind is reproduced through LeRobot's own bus: the calibration
is written into the (simulated) motors and saved as ``<calibration_dir>/<id>.json``. The ranges
differ per joint and one homing offset is non-zero, so a mix-up of joints or of the offset's sign
shows in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feetech_sim import FeetechBusSim

IDS = [1, 2, 3, 4, 5, 6]
RANGES = {1: (1000, 3000), 2: (800, 3200), 3: (900, 3100), 4: (1100, 2900), 5: (0, 4095), 6: (2000, 3400)}
OFFSETS = {1: 0, 2: -120, 3: 35, 4: 0, 5: 0, 6: 0}


def calibrated_so101(kind: str, calibration_dir: Path, robot_id: str = "rig") -> tuple[FeetechBusSim, dict[str, Any]]:
    """A started bus simulator holding a calibrated SO-101 ``kind`` ('follower' or 'leader') and
    the LeRobot config arguments that reach it. The caller closes the simulator."""
    from lerobot.motors import MotorCalibration

    if kind == "follower":
        from lerobot.robots.so101_follower import SO101Follower as Cls
        from lerobot.robots.so101_follower import SO101FollowerConfig as Cfg
    else:
        from lerobot.teleoperators.so101_leader import SO101Leader as Cls
        from lerobot.teleoperators.so101_leader import SO101LeaderConfig as Cfg

    sim = FeetechBusSim(IDS).__enter__()
    args = {"port": sim.port, "id": robot_id, "calibration_dir": str(calibration_dir)}
    dev = Cls(Cfg(port=sim.port, id=robot_id, calibration_dir=Path(calibration_dir)))
    cal = {name: MotorCalibration(id=m.id, drive_mode=0, homing_offset=OFFSETS[m.id],
                                  range_min=RANGES[m.id][0], range_max=RANGES[m.id][1])
           for name, m in dev.bus.motors.items()}
    dev.bus.connect()
    dev.bus.write_calibration(cal)
    dev.bus.disconnect(disable_torque=False)
    dev.calibration = cal
    dev._save_calibration()  # noqa: SLF001 - the file lerobot-calibrate writes
    return sim, args
