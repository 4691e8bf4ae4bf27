"""Any LeRobot ``Robot`` as a qc-robot driver (``driver=lerobot``).

The robot is chosen like on LeRobot's command line: a config type (``so101_follower``, ``koch_follower``,
``lekiwi``, ...) and that config's arguments (``port``, ``id``, ``calibration_dir``, ``cameras``,
``max_relative_target``...). The adapter maps LeRobot's feature dicts onto our spec:

* observation ``state``: the robot's scalar features (``shoulder_pan.pos``, ...) in feature order;
  each camera feature ``(h, w, 3)`` becomes its own ``uint8`` image field under the camera's name;
* action: the robot's action features in order. ``action_mode='delta'`` (default): each action
  moves every joint's target by up to ``max_step`` per control step and zeros hold, the OGBench
  convention the rest of the stack (hold policy, safety layer, agent) assumes; a teleop leader
  arm is then followed at that bounded rate. ``'absolute'``: the action is the joint target
  itself (LeRobot's convention, for its datasets). With ``normalize`` (default) every joint's
  calibrated range maps onto [-1, 1], state and targets alike.

Joint ranges come from the LeRobot calibration file (``range_min``/``range_max`` of each motor and
its normalisation mode), so a target outside the range the arm was calibrated to never reaches a
motor; ``joint_low``/``joint_high`` replace them in the map to [-1, 1] (a dataset's range), and
the calibration still bounds every target. Holding keeps the last target sent (not the
measured position, which sags under gravity and would creep), but a delta target never runs
more than one step ahead of the measured pose: a blocked joint or a gripper closed on an object
does not wind its target up to the joint limit. LeRobot's own ``max_relative_target`` (a cap of
each goal relative to the present position, None by default in LeRobot) is set by default, and
so is a torque limit of the gripper. LeRobot is imported when the driver is built (optional
extra ``qc-robot[lerobot]``); nothing here imports torch itself.

Faults: a failed bus read raises SensorError (the safety layer holds; the row is flagged held);
``max_io_errors`` consecutive failures end the episode. ``stop`` never reads the bus; ``close``
stops, moves to the ``park`` pose (if set), then releases the bus, with torque left on unless
``release_torque`` (the SO-101 falls without torque), and never raises.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.drivers.base import Driver, DriverSpec, IOBudgetSpent, SensorError, arm_episode_steps
from qc_robot.drivers.late_replies import drop_late_replies, serial_ports
from qc_robot.drivers.lerobot_versions import (
    import_failure,
    legacy_calibration_dir,
    type_modules,
    unknown_type_message,
)
from qc_robot.policies.base import ObsField

log = logging.getLogger("qc_robot.lerobot")


@dataclass
class LeRobotConfig:
    robot_type: str = "so101_follower"
    """LeRobot robot config type (``--robot.type`` of ``lerobot-record``)."""
    robot_args: dict[str, Any] = field(default_factory=dict)
    """That config's fields, e.g. ``{port: /dev/ttyACM0, id: my_arm, max_relative_target: 10}``."""
    control_hz: float = 20.0
    """The rate policies are trained at here (the sim tasks' 20 Hz; LeRobot records at 30)."""
    max_episode_steps: int = 0
    """Steps before an episode is truncated; 0: 30 s of control ticks (600 at 20 Hz,
    ``base.ARM_EPISODE_S``), negative: no limit (episodes end only by the operator)."""
    action_mode: str = "delta"
    """'delta' (a step of at most ``max_step`` per joint) or 'absolute' (joint targets). The hold (a
    tick with no fresh command) keeps every joint's target, the gripper's included, so a grasp is
    kept: zeros in delta mode, the current targets in absolute mode."""
    max_step: float = 0.05
    """delta: largest change of a joint target per step for a unit action, in target units (with
    ``normalize``: fractions of the [-1, 1] range, so 0.05 is 2.5 % of the joint's travel)."""
    normalize: bool = True
    """Joint targets and state in [-1, 1] over each joint's range (False: LeRobot's own units)."""
    joint_low: list[float] = field(default_factory=list)
    """Per action feature, in LeRobot units; [] = from the robot's calibration. Targets still stay
    inside the calibrated range where the robot has one."""
    joint_high: list[float] = field(default_factory=list)
    home: list[float] = field(default_factory=list)
    """Joint targets ``reset`` moves to (normalised unless ``normalize`` is off); [] = stay put."""
    reset_s: float = 3.0
    """Duration of the move to ``home`` (interpolated at the control rate)."""
    stop_torque_off: bool = False
    """``stop()`` switches torque off (the arm falls!) instead of holding where it is."""
    park: list[float] = field(default_factory=list)
    """Joint targets (like ``home``) ``close`` and a faulted episode end move to before release: a
    rest pose; [] = stop where the arm is."""
    release_torque: bool = False
    """``close`` switches torque off after the park move (only safe where the park pose rests the
    arm on something); False keeps the motors holding while powered. Replaces LeRobot's
    ``disable_torque_on_disconnect``, which would drop the arm before any park."""
    max_relative_target: float = 0.2
    """LeRobot's cap of each goal relative to the present position, in target units (with
    ``normalize``: fraction of the [-1, 1] range), set on robots whose config has one unless
    ``robot_args.max_relative_target`` is given (LeRobot units); 0: off."""
    gripper_torque_limit: int = 500
    """``Torque_Limit`` (0-1000 of the stall torque, a RAM register) of a Feetech motor named
    ``gripper``, written at connect and restored at close, so a gripper closed on an object does
    not stall at full torque; 0: leave it."""
    read_retries: int = 1
    """Immediate retries of a failed bus read (a dropped status packet) before it counts as an error."""
    max_io_errors: int = 5
    """Consecutive failed bus reads/writes (each read a hold, each write a skipped command) before
    the episode ends (the arm parked)."""
    obs_key: str = "state"


# -- building LeRobot objects by config type ------------------------------------------------------


def _import_lerobot(package: str) -> Any:
    try:
        return importlib.import_module(package)
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision not built for this torch (0.4)
        raise RuntimeError(import_failure(e)) from e


def _import_type_module(module: str) -> None:
    """Import a module that may register a config type; one this LeRobot lacks is skipped, but one
    that exists and fails (a missing dependency) says so."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise RuntimeError(f"{module} does not import: {import_failure(e)}") from e


def _config_class(base: Any, package: str, type_name: str) -> Any:
    """The registered config class for ``type_name``; imports the package's modules to register it."""
    for module in type_modules(type_name):  # most types live in a module of the same name (0.4: a map)
        if type_name not in base.get_known_choices():
            _import_type_module(f"{package}.{module}")
    if type_name not in base.get_known_choices():
        pkg = importlib.import_module(package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            try:  # modules whose optional SDK is missing cannot register: skip them
                importlib.import_module(f"{package}.{mod.name}")
            except Exception:  # noqa: BLE001 - any import failure just means "not available"
                continue
    if type_name not in base.get_known_choices():
        raise ValueError(unknown_type_message(type_name, sorted(base.get_known_choices())))
    return base.get_choice_class(type_name)


def lerobot_config_class(kind: str, type_name: str) -> Any:
    """LeRobot's config class for a robot (``kind='robots'``) or teleoperator (``'teleoperators'``)
    type; RuntimeError when LeRobot or what its modules import is missing, ValueError for an unknown type."""
    mod = _import_lerobot(f"lerobot.{kind}")
    return _config_class(mod.RobotConfig if kind == "robots" else mod.TeleoperatorConfig, f"lerobot.{kind}", type_name)


def _build(kind: str, type_name: str, args: Mapping[str, Any]) -> Any:
    """A LeRobot robot (``kind='robots'``) or teleoperator (``'teleoperators'``) from type and args."""
    device = _make(kind, type_name, args)
    legacy = legacy_calibration_dir(device, type_name, dict(args))
    if legacy is not None:  # a calibration made under LeRobot 0.3, where 0.4 does not look
        log.info("using the LeRobot 0.3 calibration folder %s", legacy)
        device = _make(kind, type_name, {**args, "calibration_dir": str(legacy)})
    return device


def _make(kind: str, type_name: str, args: Mapping[str, Any]) -> Any:
    draccus = _import_lerobot("draccus")
    package = f"lerobot.{kind}"
    mod = _import_lerobot(package)
    base = mod.RobotConfig if kind == "robots" else mod.TeleoperatorConfig
    cls = _config_class(base, package, type_name)
    if kind == "robots" and args.get("cameras"):
        for cam in ("opencv", "realsense"):  # camera config types register on import (as LeRobot's CLI does)
            try:
                importlib.import_module(f"lerobot.cameras.{cam}")
            except ImportError:  # its SDK is missing: that camera type stays unknown
                pass
    try:
        config = draccus.decode(cls, dict(args))
    except Exception as e:  # draccus raises its own parsing errors: say which config failed
        raise ValueError(f"bad arguments for LeRobot {type_name!r}: {e}") from e
    factory = mod.make_robot_from_config if kind == "robots" else mod.make_teleoperator_from_config
    try:
        return factory(config)
    except ValueError:  # a type the factory does not list (a plugin): find its class by config class
        root = mod.Robot if kind == "robots" else mod.Teleoperator
        stack = list(root.__subclasses__())
        while stack:
            sub = stack.pop()
            if getattr(sub, "config_class", None) is cls:
                return sub(config)
            stack.extend(sub.__subclasses__())
        raise


def make_lerobot_robot(robot_type: str, robot_args: Mapping[str, Any]) -> Any:
    """The LeRobot ``Robot`` for ``robot_type`` (e.g. ``so101_follower``) built from its arguments."""
    return _build("robots", robot_type, robot_args)


def make_lerobot_teleoperator(teleop_type: str, teleop_args: Mapping[str, Any]) -> Any:
    """The LeRobot ``Teleoperator`` for ``teleop_type`` (e.g. ``so101_leader``)."""
    return _build("teleoperators", teleop_type, teleop_args)


def joint_ranges(device: Any, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) in LeRobot units of each ``<motor>.pos`` key, from the device's bus calibration.

    Raises ValueError when a key is not a calibrated motor position (set joint_low/joint_high then).
    """
    from lerobot.motors import MotorNormMode

    bus = getattr(device, "bus", None)
    cal = getattr(device, "calibration", None) or getattr(bus, "calibration", None) or {}
    lo, hi = [], []
    for key in keys:
        motor = key.removesuffix(".pos")
        if bus is None or not key.endswith(".pos") or motor not in bus.motors:
            raise ValueError(f"cannot derive a range for {key!r}: set joint_low/joint_high")
        if motor not in cal:
            raise ValueError(f"{device} has no calibration for {motor!r} (looked in {device.calibration_fpath}); "
                             f"run `lerobot-calibrate` for this robot id first, or set joint_low/joint_high")
        m, c = bus.motors[motor], cal[motor]
        if m.norm_mode is MotorNormMode.RANGE_M100_100:
            a, b = -100.0, 100.0
        elif m.norm_mode is MotorNormMode.RANGE_0_100:
            a, b = 0.0, 100.0
        elif m.norm_mode is MotorNormMode.DEGREES:
            mid = (c.range_min + c.range_max) / 2
            res = bus.model_resolution_table[m.model] - 1
            a, b = (c.range_min - mid) * 360 / res, (c.range_max - mid) * 360 / res
        else:  # pragma: no cover - a mode added by a later LeRobot
            raise ValueError(f"unsupported norm mode {m.norm_mode} for {motor!r}")
        lo.append(a)
        hi.append(b)
    return np.asarray(lo, np.float64), np.asarray(hi, np.float64)


class JointMap:
    """Ordered LeRobot feature dict <-> vector, optionally normalised to [-1, 1] per key."""

    def __init__(self, keys: list[str], low: np.ndarray, high: np.ndarray, normalize: bool) -> None:
        if not (len(keys) == len(low) == len(high)) or np.any(np.asarray(high) <= np.asarray(low)):
            raise ValueError(f"need one low < high per key {keys}, got {list(low)} / {list(high)}")
        self.keys, self.low, self.high, self.normalize = list(keys), np.asarray(low), np.asarray(high), normalize

    def to_vector(self, values: Mapping[str, Any]) -> np.ndarray:
        v = np.asarray([float(values[k]) for k in self.keys], np.float64)
        if self.normalize:
            v = 2.0 * (v - self.low) / (self.high - self.low) - 1.0
        return v.astype(np.float32)

    def to_dict(self, vec: np.ndarray) -> dict[str, float]:
        v = np.asarray(vec, np.float64)
        if self.normalize:
            v = self.low + (v + 1.0) * 0.5 * (self.high - self.low)
        return {k: float(x) for k, x in zip(self.keys, v, strict=True)}


class LeRobotDriver(Driver):
    """A LeRobot robot behind the Driver API (hardware: realtime, no seeded randomness)."""

    name = "lerobot"
    realtime = True

    def __init__(self, cfg: LeRobotConfig | None = None, robot: Any = None) -> None:
        """``robot``: an already built LeRobot ``Robot`` (tests, notebooks); else built from ``cfg``."""
        self.cfg = cfg = cfg or LeRobotConfig()
        if "disable_torque_on_disconnect" in cfg.robot_args:
            raise ValueError("set driver_args.release_torque instead of robot_args.disable_torque_on_disconnect "
                             "(torque off only after the park move)")
        self.robot = robot if robot is not None else make_lerobot_robot(cfg.robot_type, cfg.robot_args)
        feats = dict(self.robot.observation_features)
        self._state_keys = [k for k, v in feats.items() if not isinstance(v, tuple)]
        self._camera_keys = [k for k, v in feats.items() if isinstance(v, tuple)]
        act_keys = list(self.robot.action_features)
        self._limits: tuple[np.ndarray, np.ndarray] | None = None  # calibrated range, LeRobot units
        self._ports: list[Any] = []  # the buses' serial ports, emptied of late replies before each transaction
        if cfg.joint_low or cfg.joint_high:
            low, high = np.asarray(cfg.joint_low, np.float64), np.asarray(cfg.joint_high, np.float64)
            with contextlib.suppress(ValueError):  # no calibrated bus: the given range is all there is
                self._limits = joint_ranges(self.robot, act_keys)
        else:
            low, high = joint_ranges(self.robot, act_keys)
        self.actions = JointMap(act_keys, low, high, cfg.normalize)
        # state: joints that are also action keys share their range; other scalars stay raw
        ranges = dict(zip(act_keys, zip(low, high, strict=True), strict=True))
        s_lo = np.asarray([ranges.get(k, (-1.0, 1.0))[0] for k in self._state_keys])
        s_hi = np.asarray([ranges.get(k, (-1.0, 1.0))[1] for k in self._state_keys])
        self._state_norm = np.asarray([k in ranges for k in self._state_keys])
        self._state_lo, self._state_hi = s_lo, s_hi
        a = len(act_keys)
        if cfg.action_mode not in ("delta", "absolute"):
            raise ValueError(f"action_mode must be 'delta' or 'absolute', got {cfg.action_mode!r}")
        if cfg.action_mode == "delta" and cfg.max_step <= 0:
            raise ValueError("max_step must be > 0")
        self.absolute_actions = cfg.action_mode == "absolute"
        # joint targets live in "target units": [-1, 1] when normalised, LeRobot units otherwise
        self._tgt_lo, self._tgt_hi = ((-np.ones(a), np.ones(a)) if cfg.normalize else (low, high))
        self._tgt_lo, self._tgt_hi = self._tgt_lo.astype(np.float32), self._tgt_hi.astype(np.float32)
        # LeRobot units per target unit, per joint
        self._per_unit = (high - low) / 2.0 if cfg.normalize else np.ones(a)
        self._cap = self._relative_target_cap()
        if not self.absolute_actions and self._cap is not None and np.any(cfg.max_step > self._cap + 1e-9):
            raise ValueError(f"max_step {cfg.max_step} per step exceeds the relative-target cap "
                             f"{float(self._cap.min()):.4g} (LeRobot would cut every step): lower max_step or raise "
                             "max_relative_target")
        act_lo, act_hi = (self._tgt_lo, self._tgt_hi) if self.absolute_actions else (-np.ones(a), np.ones(a))
        fields = [ObsField(cfg.obs_key, (len(self._state_keys),), "float32")]
        fields += [ObsField(k, tuple(int(s) for s in feats[k]), "uint8") for k in self._camera_keys]
        self.spec = DriverSpec(fields, a, act_lo, act_hi, cfg.control_hz,
                                 arm_episode_steps(cfg.max_episode_steps, cfg.control_hz))
        for key in ("home", "park"):
            if getattr(cfg, key) and len(getattr(cfg, key)) != a:
                raise ValueError(f"{key} needs {a} values ({act_keys}), got {len(getattr(cfg, key))}")
        if hasattr(getattr(self.robot, "config", None), "disable_torque_on_disconnect"):
            self.robot.config.disable_torque_on_disconnect = cfg.release_torque  # applied after the park
        self.max_io_errors = cfg.max_io_errors
        self._target: np.ndarray | None = None  # last joint targets the motors were given
        self._measured: np.ndarray | None = None  # joint positions of the last good read (target units)
        self._last_applied = np.zeros(a, np.float32)
        self._obs: dict[str, np.ndarray] | None = None
        self._grip_limit0: int | None = None  # the gripper's torque limit before connect

    def _relative_target_cap(self) -> np.ndarray | None:
        """Per joint, LeRobot's ``max_relative_target`` in target units (None: off). Sets it on the
        robot's config: ours by default, the user's made a float (LeRobot 0.3.3 types it ``int``
        but only accepts a float or a dict)."""
        config: Any = getattr(self.robot, "config", None)
        if not hasattr(config, "max_relative_target"):
            return None
        motors = [k.removesuffix(".pos") for k in self.actions.keys]
        user = config.max_relative_target
        if user is not None:
            caps = np.asarray([float(user[m]) for m in motors] if isinstance(user, Mapping) else [float(user)] * len(motors))
        elif self.cfg.max_relative_target > 0:
            caps = self.cfg.max_relative_target * self._per_unit
        else:
            return None
        config.max_relative_target = {m: float(c) for m, c in zip(motors, caps, strict=True)}
        return caps / self._per_unit

    # -- lifecycle ------------------------------------------------------------------------------------
    def connect(self) -> None:
        if self.robot.is_connected:
            self._ports = serial_ports(self.robot)
            return
        self._connect_robot()
        self._ports = serial_ports(self.robot)  # pyserial opens them at connect: found once, here
        if not self.robot.is_calibrated:
            self.robot.disconnect()
            raise RuntimeError(f"{self.robot} is not calibrated (its motors do not match "
                               f"{self.robot.calibration_fpath}); run `lerobot-calibrate "
                               f"--robot.type={self.cfg.robot_type} --robot.port=... --robot.id={self.robot.id}`")
        self._limit_gripper()
        self._target = self._measured = self._read_joints()

    def _connect_robot(self) -> None:
        """LeRobot's connect (calibration is an interactive LeRobot step, never implicit), once more
        after a communication error: configuring the motors is a few dozen acknowledged writes, and
        one packet lost on a USB adapter would otherwise end the run before it starts."""
        for attempt in (1, 2):
            try:
                self.robot.connect(calibrate=False)
                return
            except ConnectionError as e:
                if attempt == 2:
                    raise
                log.warning("connect: %s; connecting once more", e)
                with contextlib.suppress(Exception):  # the bus may be open, half configured
                    if self.robot.is_connected:
                        self.robot.disconnect()


    def _limit_gripper(self) -> None:
        bus = getattr(self.robot, "bus", None)
        if not self.cfg.gripper_torque_limit or bus is None or "gripper" not in getattr(bus, "motors", {}):
            return
        try:
            self._grip_limit0 = int(bus.read("Torque_Limit", "gripper", normalize=False))
            bus.write("Torque_Limit", "gripper", int(self.cfg.gripper_torque_limit), normalize=False)
        except (KeyError, AttributeError):  # not a Feetech bus: no such register
            self._grip_limit0 = None

    def close(self) -> None:
        """Stop, park, restore the gripper's torque limit, release the bus; never raises (a dead
        bus is logged: the error that ended the run must stay the one reported)."""
        if not self.robot.is_connected:
            return
        bus: Any = getattr(self.robot, "bus", None)
        port: Any = getattr(bus, "port_handler", None)
        if port is not None:  # a transaction cut by Ctrl-C / SIGTERM leaves the port marked busy
            port.is_using = False
            with contextlib.suppress(Exception):
                port.clearPort()
        try:
            self.park()
        except Exception as e:  # noqa: BLE001 - best effort: the bus may be what failed
            log.error("could not park the arm before release: %s", e)
        if self._grip_limit0 is not None:
            try:
                bus.write("Torque_Limit", "gripper", self._grip_limit0, normalize=False)
            except Exception as e:  # noqa: BLE001
                log.error("could not restore the gripper's torque limit: %s", e)
            self._grip_limit0 = None
        try:
            self.robot.disconnect()  # torque off here only with release_torque
        except Exception as e:  # noqa: BLE001
            log.error("disconnect failed (%s): closing the port", e)
            with contextlib.suppress(Exception):  # nothing more can be done
                port.closePort()

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Move to ``home`` (if set) over ``reset_s``; the seed is ignored (real arms are not seeded)."""
        self.connect()
        self._target = self._measured = self._read_joints()
        self._io_clear()
        if self.cfg.home:
            self._move_to(self.cfg.home, self.cfg.reset_s)
        self._reset_steps()
        self._obs = None
        try:
            return self.get_observation()
        except SensorError as e:  # no first observation: the episode cannot start
            raise ConnectionError(f"{self.robot}: no observation after reset: {e}") from e

    def _move_to(self, pose: list[float], duration_s: float) -> None:
        """Interpolate the targets to ``pose`` over ``duration_s`` (longer when a step would exceed
        half the relative-target cap), at the control rate."""
        goal = np.clip(np.asarray(pose, np.float32), self._tgt_lo, self._tgt_hi)
        start = self.hold_target()
        n = max(1, int(round(duration_s * self.cfg.control_hz)))
        if self._cap is not None:
            n = max(n, int(np.ceil(np.max(np.abs(goal - start) / (0.5 * self._cap)))))
        for i in range(1, n + 1):
            self._send(start + (goal - start) * (i / n))
            if i < n:
                time.sleep(1.0 / self.cfg.control_hz)

    # -- observation ----------------------------------------------------------------------------------
    def _observe(self) -> dict[str, Any]:
        """The robot's observation dict; a failed read is retried ``read_retries`` times at once."""
        for attempt in range(self.cfg.read_retries + 1):
            drop_late_replies(self._ports)
            try:
                return self.robot.get_observation()
            except Exception as e:  # a dropped packet: the next try usually gets through
                if attempt == self.cfg.read_retries:
                    raise
                log.info("read failed, retrying: %s", e)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_joints(self) -> np.ndarray:
        return self.actions.to_vector(self._observe())

    def get_observation(self) -> dict[str, np.ndarray]:
        """The current reading; a failed read raises SensorError (never the last one again)."""
        try:
            raw = self._observe()
        except Exception as e:  # the safety layer holds; past the budget the episode ends
            raise self._io_failed("read", e) from e
        self._io_ok()
        state = np.asarray([float(raw[k]) for k in self._state_keys], np.float64)
        if self.cfg.normalize:
            scaled = 2.0 * (state - self._state_lo) / (self._state_hi - self._state_lo) - 1.0
            state = np.where(self._state_norm, scaled, state)
        obs = {self.cfg.obs_key: state.astype(np.float32)}
        for k in self._camera_keys:
            obs[k] = np.ascontiguousarray(raw[k], dtype=np.uint8)
        self._measured = self.actions.to_vector(raw)
        self._obs = obs
        return {k: v.copy() for k, v in obs.items()}

    # -- commands -------------------------------------------------------------------------------------
    @property
    def target(self) -> np.ndarray | None:
        """The joint targets last sent (target units), None before the first connect."""
        return None if self._target is None else self._target.copy()

    def _send(self, target: np.ndarray) -> None:
        goal = self._bounded(self.actions.to_dict(target))
        drop_late_replies(self._ports)  # LeRobot may read the present position first
        sent = self.robot.send_action(goal)  # LeRobot may clip (max_relative_target)
        self._target = np.clip(self.actions.to_vector(sent), self._tgt_lo, self._tgt_hi)

    def _bounded(self, goal: dict[str, float]) -> dict[str, float]:
        """``goal`` inside the calibrated range where joint_low/joint_high replaced it (a dataset's range):
        LeRobot bounds goals to the calibration in its range units, not in degrees (0.4's default)."""
        if self._limits is None:
            return goal
        lo, hi = self._limits
        return {k: min(max(v, float(a)), float(b)) for (k, v), a, b in zip(goal.items(), lo, hi, strict=True)}

    def _apply(self, action: np.ndarray) -> None:
        prev = self.hold_target()
        if self.absolute_actions:
            target = action
        else:  # from the last target, but never more than one step from the measured pose (5 % slack
            step = self.cfg.max_step  # for the servos' tick quantisation: a free joint gets whole steps)
            target = prev + action * step
            if self._measured is not None:
                target = np.clip(target, self._measured - 1.05 * step, self._measured + 1.05 * step)
            target = np.clip(target, self._tgt_lo, self._tgt_hi)
        try:
            self._send(target)
            self._io_ok("write")
        except Exception as e:  # a skipped command; past the budget the episode ends
            err = self._io_failed("write", e)
            if isinstance(err, IOBudgetSpent):
                raise err from e
        # what was applied, in action units: the target reached, or the step actually taken
        now = self.hold_target()
        applied = now if self.absolute_actions else (now - prev) / self.cfg.max_step
        self._last_applied = np.clip(applied, self.spec.action_low, self.spec.action_high).astype(np.float32)
        self._count_step(self.spec.max_episode_steps)

    def send_action(self, action: Any) -> np.ndarray:
        """As the base class, but returns what reached the motors (after LeRobot's own clipping and,
        in delta mode, the joint ranges)."""
        super().send_action(action)
        return self._last_applied.copy()

    def hold_target(self) -> np.ndarray:
        """The joint targets that keep the arm where it was last sent (target units)."""
        if self._target is None:
            return np.clip(np.zeros(self.spec.action_dim, np.float32), self._tgt_lo, self._tgt_hi)
        return self._target.astype(np.float32)

    def hold_action(self) -> np.ndarray:
        if self.absolute_actions:
            return np.clip(self.hold_target(), self.spec.action_low, self.spec.action_high)
        return np.zeros(self.spec.action_dim, np.float32)

    def action_towards(self, joints: Mapping[str, Any]) -> np.ndarray:
        """The action that brings the arm to ``joints`` (a LeRobot action dict, e.g. a leader arm's
        reading): the target itself, or in delta mode the bounded step toward it."""
        goal = self.actions.to_vector(joints)
        if self.absolute_actions:
            return np.clip(goal, self.spec.action_low, self.spec.action_high)
        return np.clip((goal - self.hold_target()) / self.cfg.max_step, -1.0, 1.0).astype(np.float32)

    def joint_distance(self, joints: Mapping[str, Any]) -> float:
        """The largest per-joint gap between ``joints`` (a leader arm's reading) and the pose last
        measured here, in target units: how far a leader is moved away from the follower (its
        takeover threshold, ``drive operator=lerobot``). 0 before the first read."""
        if self._measured is None:
            return 0.0
        return float(np.max(np.abs(self.actions.to_vector(joints) - self._measured)))

    def stop(self) -> None:
        """Hold where the arm was last measured (or torque off with ``stop_torque_off``), without
        reading the bus: one write, so a stop on a failing bus fails alone (and raises)."""
        bus = getattr(self.robot, "bus", None)
        if self.cfg.stop_torque_off and bus is not None:
            bus.disable_torque()
            return
        pose = self._measured if self._measured is not None else self.hold_target()
        held = np.clip(pose, self._tgt_lo, self._tgt_hi)
        if bus is not None:  # the bus directly: the robot's send_action reads first (max_relative_target)
            # where the calibration bounds the goal, a pose outside joint_low/joint_high is held as measured
            goal = self._bounded(self.actions.to_dict(held if self._limits is None else pose))
            bus.sync_write("Goal_Position", {k.removesuffix(".pos"): v for k, v in goal.items()})
            self._target = held.astype(np.float32)
        else:
            self._send(held)

    def park(self) -> None:
        """Stop, then move to the ``park`` pose (if set)."""
        self.stop()
        if self.cfg.park and not self.cfg.stop_torque_off:
            self._move_to(self.cfg.park, self.cfg.reset_s)
