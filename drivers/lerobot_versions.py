"""What differs between the LeRobot releases ``driver=lerobot`` and ``device=lerobot`` support
(0.3.x and 0.4.x), kept in one place; the adapter itself is the same for both.

The robot and teleoperator API is unchanged (features, ``connect``, ``get_observation``,
``send_action``, the Feetech bus). What moved in 0.4:

* the SO-100 and SO-101 modules were merged into ``so_follower`` / ``so_leader``: the config types
  keep their names (``so101_follower``, ``so100_leader``, ...), but no module is named after them;
* the bimanual SO types were renamed (``bi_so100_follower`` -> ``bi_so_follower``) and take one
  config per arm instead of ``left_arm_port``-style fields, so they are not translated;
* the merged class is named ``so_follower`` (``so_leader``), and LeRobot's default calibration
  folder is named after the class: a 0.3 calibration under ``.../robots/so101_follower/`` is not
  found there (:func:`legacy_calibration_dir`);
* the SO arms' body joints default to degrees (``use_degrees``), ±100 range units in 0.3; with the
  driver's ``normalize`` both map the calibrated range onto the same [-1, 1];
* importing a robot class imports LeRobot's processors, hence torch, torchvision, einops and its
  dataset stack (0.3 needed torch alone besides the bus packages): :func:`import_failure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODULES: dict[str, str] = {
    # config type -> the LeRobot module registering it, where that module is not named after the type (0.4)
    "so100_follower": "so_follower", "so101_follower": "so_follower",
    "so100_leader": "so_leader", "so101_leader": "so_leader",
}

RENAMED: dict[str, str] = {
    # a type name of one release (or a module name people type) -> its name in the other
    "bi_so100_follower": "bi_so_follower", "bi_so_follower": "bi_so100_follower",
    "bi_so100_leader": "bi_so_leader", "bi_so_leader": "bi_so100_leader",
    "so_follower": "so101_follower", "so_leader": "so101_leader",
}

INSTALL_HINT = ('pip install --no-deps "lerobot==0.3.3" (or "lerobot==0.4.4") beside the project\'s torch, then '
                '"qc-robot[lerobot-deps]"; 0.4 also needs einops, a torchvision built for this torch and LeRobot\'s '
                "dataset stack (docs/lerobot.md)")


def type_modules(type_name: str) -> list[str]:
    """The modules of ``lerobot.robots`` / ``lerobot.teleoperators`` that may register ``type_name``,
    most likely first."""
    return [type_name] + ([MODULES[type_name]] if type_name in MODULES else [])


def unknown_type_message(type_name: str, known: list[str]) -> str:
    """One line for a type the installed LeRobot does not register, naming the other release's name."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = f"LeRobot {version('lerobot')}"
    except PackageNotFoundError:  # pragma: no cover - lerobot importable from a source tree
        release = "this LeRobot"
    hint = f" (did you mean {RENAMED[type_name]!r}?)" if RENAMED.get(type_name) in known else ""
    return f"unknown LeRobot type {type_name!r}{hint}; available in {release}: {known}"


def import_failure(e: BaseException) -> str:
    """Why LeRobot's robot modules did not import, in one line with the fix."""
    if isinstance(e, RuntimeError) and "torchvision::" in str(e):
        return ("LeRobot 0.4 imports torchvision with its robot classes, and the installed torchvision does not "
                f"match torch ({e}): install the torchvision built for this torch (docs/lerobot.md)")
    missing = getattr(e, "name", None)
    if isinstance(e, ModuleNotFoundError) and missing and missing.split(".")[0] != "lerobot":
        return f"LeRobot's robot modules import {missing!r}, which is not installed: {INSTALL_HINT}"
    return f"LeRobot is not installed or incomplete ({e}): {INSTALL_HINT}"


def legacy_calibration_dir(device: Any, type_name: str, args: dict[str, Any]) -> Path | None:
    """Where LeRobot 0.3 kept the calibration of ``device`` when 0.4 looks elsewhere and finds none.

    LeRobot's default folder is ``<calibration root>/<robots|teleoperators>/<class name>``; 0.3 named
    the SO classes after their type (``so101_follower``), 0.4 ``so_follower``. None when the folder
    was given, the file is where LeRobot looks, or no 0.3 file exists.
    """
    fpath = getattr(device, "calibration_fpath", None)
    if args.get("calibration_dir") or fpath is None or Path(fpath).is_file():
        return None
    legacy = Path(fpath).parent.parent / type_name
    return legacy if legacy != Path(fpath).parent and (legacy / Path(fpath).name).is_file() else None
