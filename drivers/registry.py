"""Every driver, registered in exactly this one place: name → (config dataclass, driver class).

A new driver adds one line here and is then reachable as ``qc-robot drive driver=<name>`` and
covered by the conformance tests without new test code. Driver modules import their SDKs lazily,
so importing this registry is cheap.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qc_robot.drivers.base import Driver
from qc_robot.drivers.lerobot_driver import LeRobotConfig, LeRobotDriver
from qc_robot.drivers.mock import MockConfig, MockDriver
from qc_robot.drivers.safety import SafeDriver, SafetyConfig
from qc_robot.drivers.sim import SimConfig, SimDriver
from qc_robot.drivers.xarm import XArmConfig, XArmDriver

DRIVERS: dict[str, tuple[type, type[Driver]]] = {
    "mock": (MockConfig, MockDriver),
    "sim": (SimConfig, SimDriver),
    "lerobot": (LeRobotConfig, LeRobotDriver),
    "xarm": (XArmConfig, XArmDriver),
}


def driver_config(name: str, **values: Any) -> Any:
    """Driver ``name``'s config, taking from ``values`` the keys it has (others are ignored)."""
    if name not in DRIVERS:
        raise ValueError(f"unknown driver {name!r}; registered: {sorted(DRIVERS)}")
    cfg_cls = DRIVERS[name][0]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    return cfg_cls(**{k: v for k, v in values.items() if k in known})


def make_driver(name: str, cfg: Any = None) -> Driver:
    """The bare driver (tests and tools); the control loop uses :func:`make_safe_driver`."""
    if name not in DRIVERS:
        raise ValueError(f"unknown driver {name!r}; registered: {sorted(DRIVERS)}")
    cfg_cls, cls = DRIVERS[name]
    return cls(cfg if cfg is not None else cfg_cls())  # type: ignore[call-arg]


def make_safe_driver(name: str, cfg: Any = None, safety: SafetyConfig | None = None) -> SafeDriver:
    """Driver ``name`` wrapped in the safety layer (always: the layer itself can be relaxed)."""
    return SafeDriver(make_driver(name, cfg), safety or SafetyConfig())
