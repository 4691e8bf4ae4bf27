"""A calibrated SO-101 arm (follower or leader) on the simulated Feetech bus, for the LeRobot tests.

What ``lerobot-calibrate`` leaves behind is reproduced through LeRobot's own bus: the calibration
is written into the (simulated) motors and saved as ``<calibration_dir>/<id>.json``. The ranges
differ per joint and one homing offset is non-zero, so a mix-up of joints or of the offset's sign
shows in the tests.

The arm is built through the adapter's own lookup by config type (``so101_follower``/``so101_leader``),
so the same rig serves LeRobot 0.3 (modules ``so101_follower``...) and 0.4 (``so_follower``...). Its
joints are in ±100 range units (``use_degrees=False``: 0.3's default, 0.4 defaults to degrees), so
the tests can state goals in servo ticks on either release.
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

    from qc_robot.drivers.lerobot_driver import make_lerobot_robot, make_lerobot_teleoperator

    sim = FeetechBusSim(IDS).__enter__()
    args = {"port": sim.port, "id": robot_id, "calibration_dir": str(calibration_dir), "use_degrees": False}
    dev = (make_lerobot_robot("so101_follower", args) if kind == "follower"
           else make_lerobot_teleoperator("so101_leader", args))
    cal = {name: MotorCalibration(id=m.id, drive_mode=0, homing_offset=OFFSETS[m.id],
                                  range_min=RANGES[m.id][0], range_max=RANGES[m.id][1])
           for name, m in dev.bus.motors.items()}
    dev.bus.connect()
    dev.bus.write_calibration(cal)
    dev.bus.disconnect(disable_torque=False)
    dev.calibration = cal
    dev._save_calibration()  # noqa: SLF001 - the file lerobot-calibrate writes
    return sim, args
