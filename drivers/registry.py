"""Every driver, registered in exactly this one place: name → (config dataclass, driver class).

A new driver adds one line here and is then reachable as ``qc-robot drive driver=<name>`` and
covered by the conformance tests without new test code. Driver modules import their SDKs lazily,
so importing this registry is cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
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


def _config_class(name: str) -> type:
    if name not in DRIVERS:
        near = difflib.get_close_matches(name, DRIVERS, n=1)
        hint = f": did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown driver {name!r}{hint} (registered: {', '.join(sorted(DRIVERS))})")
    return DRIVERS[name][0]


def build_driver_config(name: str, common: Mapping[str, Any], user_args: Mapping[str, Any]) -> Any:
    """Driver ``name``'s typed config from the run's ``common`` values and the user's ``driver_args``.

    ``common`` holds what the verb knows for every driver (``env``, ``realtime``, ``time_scale``,
    ``seed``, ...): a driver takes the keys its config has and ignores the rest. ``user_args`` are
    the user's own keys and must all be options of this driver: a misspelt safety limit must never
    fall back to its default, so an unknown key is a ValueError of one line naming the nearest
    valid key. ``user_args`` win over ``common``.
    """
    cfg_cls = _config_class(name)
    known = [f.name for f in dataclasses.fields(cfg_cls)]  # type: ignore[arg-type]
    for key in user_args:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else f"its options: {', '.join(known)}"
            raise ValueError(f"driver {name!r} has no option driver_args.{key}: {hint}")
    values = {k: v for k, v in common.items() if k in known}
    values.update(user_args)
    try:
        return cfg_cls(**values)
    except TypeError as e:  # pragma: no cover - every key was checked above
        raise ValueError(f"driver {name!r}: {e}") from e


def driver_config(name: str, **values: Any) -> Any:
    """Driver ``name``'s config from ``values``, every one of which must be an option of it."""
    return build_driver_config(name, {}, values)


def make_driver(name: str, cfg: Any = None) -> Driver:
    """The bare driver (tests and tools); the control loop uses :func:`make_safe_driver`."""
    cfg_cls = _config_class(name)
    cls = DRIVERS[name][1]
    return cls(cfg if cfg is not None else cfg_cls())  # type: ignore[call-arg]


def make_safe_driver(name: str, cfg: Any = None, safety: SafetyConfig | None = None) -> SafeDriver:
    """Driver ``name`` wrapped in the safety layer (always: the layer itself can be relaxed)."""
    return SafeDriver(make_driver(name, cfg), safety or SafetyConfig())
