"""Cameras attached to any driver: its observation plus the newest frame of each camera.

``qc-robot drive ... cameras='[{name: agentview_image, source: 0, width: 128, height: 128}]'``
wraps the configured driver in :class:`CameraDriver`. Each camera captures on its own thread
(``qc_robot.drivers.camera``); ``get_observation`` adds the newest frame of each, and raises
:class:`~qc_robot.drivers.base.SensorError` when one is stale or failed, which the safety layer
turns into holds (``SafeDriver.sensor_fault``). Frame timestamps are kept per read
(:attr:`CameraDriver.frame_times`).

Only drivers whose rows the control loop composes can carry cameras: a driver that logs its own
steps (the realtime sim) records observations on its own clock, where the loop's frames do not
belong (the sim renders its own camera instead: ``env.image_size``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from qc_robot.drivers.base import Driver, DriverSpec, ExecutedStep, SensorError, StepInfo
from qc_robot.drivers.camera import CameraConfig, CameraStream, make_camera
from qc_robot.policies.base import ObsField


def camera_configs(items: Sequence[Any]) -> list[CameraConfig]:
    """Camera configs from dicts (the CLI's list) or CameraConfig objects; names must be unique."""
    out = [c if isinstance(c, CameraConfig) else CameraConfig(**dict(c)) for c in items]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"camera names must be unique, got {names}")
    for c in out:
        if c.width <= 0:
            raise ValueError(f"camera {c.name!r}: set width and height (the policy's image size)")
    return out


class CameraDriver(Driver):
    """``driver`` with ``cameras`` added to its observation (uint8 (H, W, 3) RGB per camera)."""

    def __init__(self, driver: Driver, cameras: Sequence[CameraStream | CameraConfig | dict[str, Any]]) -> None:
        streams = [c for c in cameras if isinstance(c, CameraStream)]
        cfgs = camera_configs([c for c in cameras if not isinstance(c, CameraStream)])
        self.cameras: list[CameraStream] = streams + [make_camera(c) for c in cfgs]
        if driver.logs_steps:
            raise ValueError(f"driver {driver.name!r} logs its own steps: cameras cannot be attached to it")
        taken = {f.key for f in driver.spec.obs_fields}
        fields = list(driver.spec.obs_fields)
        for cam in self.cameras:
            if cam.cfg.name in taken:
                raise ValueError(f"camera name {cam.cfg.name!r} is already an observation key of {driver.name!r}")
            taken.add(cam.cfg.name)
            fields.append(ObsField(cam.cfg.name, cam.shape, "uint8"))
        s = driver.spec
        self.driver = driver
        self.spec = DriverSpec(fields, s.action_dim, s.action_low, s.action_high, s.control_hz, s.max_episode_steps)
        self.name = driver.name
        self.realtime = driver.realtime
        self.absolute_actions = driver.absolute_actions
        self.frame_times: dict[str, float] = {}
        """``time.monotonic()`` capture time of each camera's frame in the last observation."""

    @property
    def reports_reward(self) -> bool:  # type: ignore[override]
        return self.driver.reports_reward

    def __getattr__(self, name: str) -> Any:  # driver-specific extras (calibration_id, env, ...)
        if name == "driver":
            raise AttributeError(name)
        return getattr(self.driver, name)

    def connect(self) -> None:
        self.driver.connect()
        for cam in self.cameras:
            cam.start()

    def close(self) -> None:
        for cam in self.cameras:
            cam.stop()
        self.driver.close()

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """The driver's reset, then current frames: waits up to each camera's ``open_timeout_s``
        for them (cameras still starting), then raises SensorError."""
        obs = self.driver.reset(seed)
        for cam in self.cameras:
            cam.start()
        deadline = time.monotonic() + max(c.cfg.open_timeout_s for c in self.cameras)
        while True:
            try:
                return self._with_frames(obs)
            except SensorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def get_observation(self) -> dict[str, np.ndarray]:
        return self._with_frames(self.driver.get_observation())

    def _with_frames(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        now = time.monotonic()
        out = dict(obs)
        for cam in self.cameras:
            frame = cam.latest(now)  # SensorError when stale or failed
            out[cam.cfg.name] = frame.image.copy()
            self.frame_times[cam.cfg.name] = frame.t
        return out

    def send_action(self, action: Any) -> np.ndarray:
        return self.driver.send_action(action)

    def _apply(self, action: np.ndarray) -> None:  # pragma: no cover - send_action is delegated whole
        self.driver.send_action(action)

    def hold_action(self) -> np.ndarray:
        return self.driver.hold_action()

    def stop(self) -> None:
        self.driver.stop()

    def step_info(self) -> StepInfo:
        return self.driver.step_info()

    def executed_steps(self) -> list[ExecutedStep] | None:
        return None

    def wait_step(self, step: int, timeout_s: float) -> bool:
        return self.driver.wait_step(step, timeout_s)
