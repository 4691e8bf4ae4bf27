"""The teleop recording loop: device → safety layer → driver at the control rate → recorder.

``qc-robot teleop`` builds the driver exactly as the policy path does (registry + safety layer),
a device and a crash-safe :class:`~qc_robot.data.recorder.Recorder`, then runs
:class:`TeleopSession`. Each episode is the control loop of ``drive``
(:func:`qc_robot.drivers.runner.run_episode`) with the operator in control of every tick and no
policy: the rows it reports (exactly one per executed robot step, also on a realtime robot) are
journaled as they come, and the verdict key commits or discards the episode.
"""

from __future__ import annotations

import getpass
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from qc_robot.data.recorder import Recorder
from qc_robot.data.rewards import FROM_RECORDED, FROM_VERDICT, REWARD_SOURCE_KEY
from qc_robot.drivers.base import ExecutedStep
from qc_robot.drivers.registry import build_driver_config, make_driver
from qc_robot.drivers.runner import Pacer, run_episode
from qc_robot.drivers.safety import SafeDriver
from qc_robot.teleop.config import TeleopConfig
from qc_robot.teleop.devices import Event, TeleopDevice, make_device
from qc_robot.teleop.operator import Operator


class StatusLine:
    """One line redrawn in place (``\\r`` + clear to end of line) on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, min_interval_s: float = 0.1) -> None:
        self.stream, self.min_interval_s = stream or sys.stdout, min_interval_s
        self.tty = enabled and self.stream.isatty()
        self._last = 0.0
        self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self._last < self.min_interval_s):
            return
        self._last, self._shown = now, True
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the status line (before ordinary output)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def message(self, text: str) -> None:
        """A permanent line (above the status line on a terminal)."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()


@dataclass
class SessionResult:
    saved: list[str] = field(default_factory=list)
    """Demo names written, in order."""
    labels: list[str] = field(default_factory=list)
    discarded: int = 0
    quit: bool = False


def _fmt(a: np.ndarray | None) -> str:
    return "[" + " ".join(f"{x:+.2f}" for x in a) + "]" if a is not None else "[hold]"


class TeleopSession:
    """Runs episodes until ``episodes`` are saved or the operator quits."""

    def __init__(self, driver: SafeDriver, device: TeleopDevice, recorder: Recorder, *, episodes: int = 0,
                 max_steps: int = 0, seed: int = 0, time_scale: float = 1.0,
                 attrs: dict[str, Any] | None = None, status: StatusLine | None = None) -> None:
        self.driver, self.device, self.recorder = driver, device, recorder
        self.episodes, self.seed = episodes, seed
        self.max_steps = max_steps or driver.spec.max_episode_steps
        self.pacer = Pacer(driver.spec.control_hz * time_scale)
        self.attrs = dict(attrs or {})
        self.status = status or StatusLine(enabled=False)
        self.result = SessionResult()
        self.operator = Operator(device, in_control=True)
        self._dt = 0.0
        self._t_last = 0.0

    def _tick_rate(self) -> None:
        now = time.monotonic()
        if self._t_last:  # average the period, not 1/period: one short catch-up tick must not spike it
            dt = now - self._t_last
            self._dt = dt if self._dt == 0 else 0.9 * self._dt + 0.1 * dt
        self._t_last = now

    def run(self) -> SessionResult:
        """The whole session; Ctrl-C quits (discarding an episode in progress)."""
        try:
            self._loop()
        except KeyboardInterrupt:
            self.result.quit = True
        finally:
            if self.recorder.recording:
                self.recorder.discard()
                self.result.discarded += 1
                self.status.message("episode in progress discarded")
            self.status.clear()
        return self.result

    def _loop(self) -> None:
        ok, index = 0, self.recorder.num_demos()
        while not (self.episodes and len(self.result.saved) >= self.episodes):
            self.status.update(f"o idle  saved {len(self.result.saved)} ({ok} success)  "
                               f"next: episode {index}  [Enter: start, Esc: quit]")
            cmd = self.device.read()
            if Event.QUIT in cmd.events:
                self.result.quit = True
                return
            if Event.START not in cmd.events:
                self.pacer.wait()
                continue
            label = self._episode(index)
            if label == "quit":
                self.result.quit = True
                return
            ok += label == "success"
            index += label in ("success", "failure")

    def _episode(self, index: int) -> str:
        """Record one episode; returns its label, 'discard' or 'quit'."""
        seed = self.seed + index
        self._dt, self._t_last = 0.0, 0.0
        attrs = dict(self.attrs, seed=seed)
        faults0 = self.driver.stats.sensor_holds
        began = False

        def record(rows: list[ExecutedStep]) -> None:
            nonlocal began
            for r in rows:
                if not began:
                    self.recorder.begin(r.obs, attrs)  # the observation the first action sees
                    began = True
                self.recorder.step(r.action, r.reward, r.terminated, r.next_obs)
            self._tick_rate()
            self.status.update(f"* REC  episode {index}  step {rows[-1].step + 1}/{self.max_steps or '-'}  "
                               f"{1.0 / self._dt if self._dt > 0 else 0.0:5.1f} Hz  action {_fmt(rows[-1].action)}")

        res = run_episode(self.driver, None, index, seed, self.pacer, on_rows=record,
                          max_steps=self.max_steps or 0, operator=self.operator, reset_phase=False)
        steps = res.rows
        verdict = {"end": "quit"}.get(res.verdict, res.verdict)
        if verdict in ("success", "failure") and self.driver.stats.sensor_holds > faults0:
            self.status.message("sensor fault during the episode: its rows would be wrong")
            verdict = "discard"
        if verdict in ("discard", "quit") or not began:
            if self.recorder.recording:
                self.recorder.discard()
            if verdict in ("discard", "quit"):
                self.result.discarded += 1
                self.status.message(f"episode {index} discarded after {steps} steps"
                                    + ("" if verdict == "quit" else f"; press Enter to re-record episode {index}"))
                return verdict
            self.status.message(f"episode {index} had no steps: not saved")
            return "discard"
        name = self.recorder.finish(verdict)
        if name is None:
            self.status.message(f"episode {index} had no steps: not saved")
            return "discard"
        self.result.saved.append(name)
        self.result.labels.append(verdict)
        self.status.message(f"episode {index}: {verdict.upper()} after {steps} steps -> {self.recorder.out}:data/{name}")
        return verdict


def env_args_for(cfg: TeleopConfig, driver: SafeDriver) -> dict[str, Any]:
    """The file-level ``env_args``: what an episode's numbers mean (merge requires equal ones)."""
    spec = driver.spec
    args: dict[str, Any] = {"driver": cfg.driver, "control_hz": float(spec.control_hz),
                            "obs_keys": [f.key for f in spec.obs_fields],
                            "obs_shapes": {f.key: list(f.shape) for f in spec.obs_fields},
                            "act_dim": spec.action_dim, "source": "qc-robot teleop",
                            # the sim reports its task's reward; a robot (or a blind sim) reports none:
                            # its rewards are the operator's verdicts
                            REWARD_SOURCE_KEY: FROM_RECORDED if cfg.driver == "sim"
                            and not cfg.driver_args.get("blind") else FROM_VERDICT}
    if cfg.driver == "sim":
        from qc_robot.sim.tasks import task_spec

        t = task_spec(cfg.env.name)
        sparse = cfg.driver_args.get("sparse_reward", cfg.env.sparse_reward)
        args.update(task=t.name, env_id=t.env_id, singletask_env_id=t.singletask_env_id, obs_dim=t.obs_dim,
                    sparse_reward=bool(t.sparse_default if sparse is None else sparse))
    return args


def build_driver(cfg: TeleopConfig) -> SafeDriver:
    """The configured driver behind the safety layer (watchdog on the scaled clock)."""
    values: dict[str, Any] = dict(env=cfg.env.name, sparse_reward=cfg.env.sparse_reward,
                                  max_episode_steps=cfg.env.max_episode_steps, realtime=cfg.realtime,
                                  time_scale=cfg.time_scale, seed=cfg.seed,
                                  image_size=cfg.env.image_size, image_key=cfg.env.image_key,
                                  camera=cfg.env.camera, render_fast=cfg.env.render_fast)
    inner = make_driver(cfg.driver, build_driver_config(cfg.driver, values, cfg.driver_args))
    if cfg.cameras:
        from qc_robot.drivers.camera_driver import CameraDriver

        inner = CameraDriver(inner, cfg.cameras)
    driver = SafeDriver(inner, cfg.safety)
    scale = cfg.time_scale
    driver.clock = lambda: time.monotonic() * scale
    return driver


def build_device(cfg: TeleopConfig, driver: SafeDriver) -> TeleopDevice:
    if cfg.device == "scripted":
        from qc_robot.drivers.sim import SimDriver
        from qc_robot.teleop.scripted import ScriptedOperator

        sim = driver.driver
        if not isinstance(sim, SimDriver):
            raise ValueError("device=scripted needs driver=sim (the oracle reads the simulator)")
        return ScriptedOperator(lambda: sim.env, cfg.oracle, cfg.oracle_noise, cfg.seed,
                                list(cfg.outcomes), cfg.end_after)
    if cfg.device == "lerobot":  # the leader commands the follower's joints: it needs the driver
        return make_device("lerobot", speed=cfg.speed, driver=driver, **cfg.device_args)
    return make_device(cfg.device, speed=cfg.speed)


def run_teleop(cfg: TeleopConfig) -> int:
    """``qc-robot teleop``: record episodes into ``cfg.out``; prints a summary."""
    try:
        driver = build_driver(cfg)
        device = build_device(cfg, driver)
    except (ValueError, RuntimeError) as e:
        print(f"teleop: {e}", file=sys.stderr)
        return 2
    with Recorder(cfg.out, env_args_for(cfg, driver), cfg.commit, cfg.fsync) as rec:
        if rec.recovered:
            print(f"recovered an unfinished episode from a previous run into {cfg.out}:data/{rec.recovered}")
        attrs = {"operator": cfg.operator or os.environ.get("USER") or getpass.getuser(), "driver": cfg.driver,
                 "device": cfg.device,
                 "calibration_id": str(getattr(driver.driver, "calibration_id", "") or cfg.calibration_id)}
        status = StatusLine(enabled=cfg.status)
        print(f"qc-robot teleop: driver {cfg.driver}" + (f" ({cfg.env.name})" if cfg.driver == "sim" else "")
              + f", device {cfg.device}, {driver.spec.control_hz * cfg.time_scale:g} Hz -> {os.path.abspath(cfg.out)}"
              + f" ({rec.num_demos()} episodes already there)")
        print(device.help(), flush=True)
        driver.connect()
        try:
            with device:
                session = TeleopSession(driver, device, rec, episodes=cfg.episodes, max_steps=cfg.max_steps,
                                        seed=cfg.seed, time_scale=cfg.time_scale, attrs=attrs, status=status)
                res = session.run()
        finally:
            driver.close()
    n_ok = res.labels.count("success")
    print(f"saved {len(res.saved)} episodes ({n_ok} success, {len(res.saved) - n_ok} failure), "
          f"discarded {res.discarded} -> {cfg.out}")
    return 0
