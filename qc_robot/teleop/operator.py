"""The operator in the loop of ``qc-robot drive``: verdicts, takeover, pause, the reset phase.

A human (or the scripted operator standing in for one) supervises a policy on the robot through
one of the teleop devices: keys or buttons end an episode as a success or a failure, discard it,
pause the robot or end the run, and while the operator *takes over* the device's commands replace
the policy's (before the safety layer, which checks them like any other). After each reset the
loop waits for the operator's "ready" (or a timed wait).

:class:`Operator` turns a device's raw reads into one :class:`OperatorTick` per control tick and
keeps the counts the drive summary prints. It runs on the robot PC: numpy and the device's own
library only (no torch, no MuJoCo; the scripted operator's oracle excepted).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.teleop.devices import Event, TeleopDevice

log = logging.getLogger("qc_robot.operator")
OPERATORS = ("none", "keyboard", "gamepad", "spacemouse", "lerobot", "scripted")
VERDICTS = ("success", "failure", "discard")


@dataclass
class OperatorConfig:
    """``drive operator_args``: the operator device's settings (unknown keys are refused)."""

    speed: float = 0.5
    """keyboard/gamepad/spacemouse: command scale in [0.1, 1] of the 5-D end-effector action."""
    device_path: str = ""
    """gamepad: the evdev path ('' = the first gamepad found)."""
    teleop_type: str = "so101_leader"
    """lerobot: the LeRobot teleoperator type of the leader arm."""
    teleop_args: dict[str, Any] = field(default_factory=dict)
    """lerobot: the teleoperator's config (port, id, ...)."""
    takeover_threshold: float = 0.1
    """lerobot: the operator takes over while the leader is farther than this from the follower
    (the follower's action units: normalised joints, so 0.1 is 5 % of a joint's range)."""
    oracle: str = "plan"
    """scripted: OGBench's cube oracle used for takeovers ('plan' or 'markov')."""
    noise: float = 0.1
    """scripted: the oracle's action noise."""
    patience: int = 30
    """scripted: steps without progress (the target cube and the gripper no closer to where they
    must go) before the operator takes over."""
    progress_eps: float = 0.01
    """scripted: metres of improvement that count as progress."""
    takeover_steps: int = 40
    """scripted: steps of one takeover (then it hands back)."""
    max_takeovers: int = 2
    """scripted: takeovers per episode at most."""
    rate: float = 1.0
    """scripted: probability that a stalled policy is taken over (the takeover-rate knob; 0 never)."""
    ready_after: int = 0
    """scripted: ticks of the reset phase before it presses ready."""
    verdicts: bool = True
    """scripted: press 'success' as soon as the sim's hidden success holds. false: leave the
    episodes' outcome to ``drive reward_model=`` (it still takes over, and reviews each of the
    detector's fires against the truth, overruling a false one)."""
    missed_after: int = 0
    """scripted, with ``verdicts=false``: press 'success' once the hidden success has held this
    many ticks without the detector firing, overruling a missed success as a person watching the
    arm does (20: a second at 20 Hz); 0: never (the detector's misses stay failures)."""
    seed: int = 0
    """scripted: seed of its takeover draws and the oracle's noise."""


def operator_config(args: Mapping[str, Any]) -> OperatorConfig:
    """``operator_args`` → config; an unknown key is refused in one line naming the nearest one."""
    known = [f.name for f in dataclasses.fields(OperatorConfig)]
    for key in args:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(known)}"
            raise ValueError(f"unknown operator_args key {key!r}{hint}")
    cfg = OperatorConfig(**dict(args))
    if not 0.0 <= cfg.rate <= 1.0:
        raise ValueError(f"operator_args.rate must be in [0, 1], got {cfg.rate}")
    if cfg.patience < 1 or cfg.takeover_steps < 1 or cfg.max_takeovers < 0:
        raise ValueError("operator_args: patience and takeover_steps must be >= 1, max_takeovers >= 0")
    return cfg


@dataclass
class OperatorTick:
    """What the operator says at one control tick."""

    action: np.ndarray | None = None
    """The device's command, used only while ``takeover`` (None: hold)."""
    takeover: bool = False
    """The operator has the controls: the policy's action is replaced (and the step flagged)."""
    verdict: str | None = None
    """'success', 'failure' or 'discard': the episode ends now with it."""
    end: bool = False
    """End the run (the episode in progress ends truncated first)."""
    paused: bool = False
    """The robot holds (pause toggled on)."""
    fault: bool = False
    """The device failed this tick (disconnected, stalled, raised): nothing it said is used."""


@dataclass
class OperatorStats:
    takeovers: int = 0
    """Takeovers started (the operator took the controls)."""
    takeover_steps: int = 0
    """Ticks under the operator's control."""
    verdicts: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VERDICTS})
    ignored_during_reset: int = 0
    """Keys pressed during a reset phase other than ready/end (ignored)."""
    device_faults: int = 0
    """Ticks the device failed (the safety layer held the robot on each)."""
    pauses: int = 0


class Operator:
    """A teleop device seen as the operator channel of ``drive`` (see the module docstring)."""

    def __init__(self, device: TeleopDevice, in_control: bool = False) -> None:
        """``in_control``: the operator drives every tick (teleop), with no policy to take over from."""
        self.device, self.in_control = device, in_control
        self.stats = OperatorStats()
        self._takeover = False
        self._paused = False
        self._in_episode = False

    @property
    def name(self) -> str:
        return self.device.name

    def open(self) -> None:
        self.device.open()

    def close(self) -> None:
        self.device.close()

    def help(self) -> str:
        return self.device.help()

    def _read(self) -> Any:
        try:
            return self.device.read()
        except Exception as e:  # a device that fails is this tick's fault, never a dead loop
            self.stats.device_faults += 1
            log.warning("operator device %s failed: %s (holding)", self.device.name, e)
            return None

    def reset_phase_tick(self) -> str | None:
        """One tick of the reset phase: 'ready', 'end', or None (keep waiting)."""
        cmd = self._read()
        if cmd is None:
            return None
        if Event.QUIT in cmd.events:
            return "end"
        if Event.START in cmd.events:
            others = [e for e in cmd.events if e is not Event.START]
            self.stats.ignored_during_reset += len(others)
            return "ready"
        if cmd.events:
            self.stats.ignored_during_reset += len(cmd.events)
            log.info("operator keys during the reset ignored: %s", [e.value for e in cmd.events])
        return None

    def review_tick(self) -> str | None:
        """One tick of the review of a success detector's fire: 'success', 'failure', 'discard'
        (counted as verdicts), 'end', or None (no word yet). Takeover and pause mean nothing here."""
        cmd = self._read()
        if cmd is None:
            return None
        verdict = next((e.value for e in cmd.events if e in (Event.SUCCESS, Event.FAILURE, Event.DISCARD)), None)
        if verdict is not None:
            self.stats.verdicts[verdict] += 1
            return verdict
        return "end" if Event.QUIT in cmd.events else None

    def detector_fired(self) -> None:
        self.device.detector_fired()

    def episode_started(self, obs: Mapping[str, np.ndarray]) -> None:
        self._takeover, self._paused, self._in_episode = False, False, True
        self.device.episode_started(obs)

    def episode_ended(self) -> None:
        self._in_episode = False
        self.device.episode_ended()

    def tick(self) -> OperatorTick:
        """The operator's word for this control tick of an episode."""
        cmd = self._read()
        if cmd is None:  # keep the takeover state: a failed device must not hand the robot back
            return OperatorTick(None, self._takeover, paused=self._paused, fault=True)
        verdict = next((e.value for e in cmd.events if e in (Event.SUCCESS, Event.FAILURE, Event.DISCARD)), None)
        if verdict is not None:
            self.stats.verdicts[verdict] += 1
        if Event.PAUSE in cmd.events:
            self._paused = not self._paused
            self.stats.pauses += self._paused
        takeover = self.in_control or bool(cmd.takeover)
        if takeover and not self._takeover:
            self.stats.takeovers += 1
        self._takeover = takeover
        self.stats.takeover_steps += takeover
        return OperatorTick(cmd.action if takeover else None, takeover, verdict, Event.QUIT in cmd.events,
                            self._paused and not takeover)

    def summary(self) -> str:
        s = self.stats
        v = ", ".join(f"{k} {n}" for k, n in s.verdicts.items())
        return (f"operator {self.name}: takeovers {s.takeovers} ({s.takeover_steps} steps), verdicts: {v}, "
                f"pauses {s.pauses}, keys ignored during resets {s.ignored_during_reset}, "
                f"device faults {s.device_faults}")


def make_operator(name: str, args: Mapping[str, Any], driver: Any) -> Operator | None:
    """The ``drive operator=`` channel for ``driver`` (a SafeDriver); None for 'none'."""
    if name not in OPERATORS:
        near = difflib.get_close_matches(name, OPERATORS, n=1)
        raise ValueError(f"unknown operator {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                         + f" (known: {', '.join(OPERATORS)})")
    cfg = operator_config(args)
    if name == "none":
        return None
    if name == "scripted":
        from qc_robot.teleop.supervisor import ScriptedSupervisor

        return Operator(ScriptedSupervisor.for_driver(driver, cfg))
    from qc_robot.teleop.devices import ACTION_DIM, make_device

    if name != "lerobot" and driver.spec.action_dim != ACTION_DIM:
        raise ValueError(f"operator={name} commands the {ACTION_DIM}-D end-effector action [dx, dy, dz, dyaw, "
                         f"gripper]; driver {driver.name} takes {driver.spec.action_dim}-D actions "
                         "(a LeRobot arm: operator=lerobot with its leader arm)")
    if name == "lerobot":
        return Operator(make_device("lerobot", speed=cfg.speed, driver=driver, teleop_type=cfg.teleop_type,
                                    teleop_args=cfg.teleop_args, takeover_threshold=cfg.takeover_threshold))
    if name == "gamepad":
        from qc_robot.teleop.devices import GamepadDevice, MergedDevice

        pad = GamepadDevice(cfg.device_path, cfg.speed)
        import sys

        if sys.stdin.isatty():
            from qc_robot.teleop.keyboard import KeyboardDevice

            return Operator(MergedDevice(pad, KeyboardDevice(speed=cfg.speed, motion=False)))
        return Operator(pad)
    return Operator(make_device(name, speed=cfg.speed))
