"""LeRobot as the tests import it: one place that skips (one line) where LeRobot or what its robot
classes import is missing, and that lets torchvision's Python load beside the CPU torch."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from skip_reasons import LEROBOT_INCOMPLETE, LEROBOT_MISSING

_keep: list[Any] = []


def torchvision_python() -> None:
    """Make torchvision's Python importable where its C extension cannot load.

    PyPI's torchvision is built for PyPI's CUDA torch; beside the CPU torch wheel this project pins,
    its ``_C`` extension does not load, and torchvision's import then fails registering fake kernels
    for two of its operators (``torchvision::nms``/``qnms``), which do not exist without it.
    Declaring those two schemas lets the pure-Python rest load: LeRobot uses only that at import
    (its datasets' transforms, 0.4's processors); no torchvision operator is ever run here.
    """
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return  # LeRobot's import then says what is missing
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _keep.append(lib)  # the schemas live as long as the library object


def require_lerobot_arms() -> None:
    """Skip unless LeRobot's SO-101 follower and leader classes and the Feetech SDK import."""
    pytest.importorskip("lerobot", reason=LEROBOT_MISSING)
    pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk not installed (pip install 'qc-robot[lerobot-deps]')")
    torchvision_python()
    from qc_robot.drivers.lerobot_driver import lerobot_config_class

    try:
        lerobot_config_class("robots", "so101_follower")
        lerobot_config_class("teleoperators", "so101_leader")
    except RuntimeError as e:  # installed, but without what its robot modules import
        pytest.skip(LEROBOT_INCOMPLETE.format(error=e), allow_module_level=True)

