"""``qc-robot replay``: play a recorded episode back through a driver and the safety layer.

The recorded actions are the ones the safety layer applied, so on the same driver they pass
unchanged; on another robot the layer clips them to that robot's limits. The sim driver in
lockstep mode with the episode's reset seed reproduces the episode exactly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import h5py
import numpy as np

from qc_robot.config import EnvConfig
from qc_robot.data.hdf5_io import DatasetError
from qc_robot.drivers.runner import Pacer
from qc_robot.drivers.safety import SafeDriver
from qc_robot.teleop.config import ReplayConfig, TeleopConfig
from qc_robot.teleop.session import StatusLine, build_driver


@dataclass
class RecordedDemo:
    name: str
    actions: np.ndarray  # (N, A)
    obs: dict[str, np.ndarray]  # key -> (N, ...)
    attrs: dict
    env_args: dict


def load_demo(path: str, episode: int) -> RecordedDemo:
    """``data/demo_<episode>`` of ``path`` (actions, observations, attrs, file env_args)."""
    try:
        with h5py.File(path, "r") as f:
            name = f"demo_{episode}"
            if f"data/{name}" not in f:
                names = sorted((k for k in f["data"] if k.startswith("demo_")), key=lambda k: int(k[5:]))
                raise DatasetError(f"{path}: no data/{name}; the file has {', '.join(names) or 'no demos'}")
            g = f["data"][name]
            raw = f["data"].attrs.get("env_args", "{}")
            return RecordedDemo(name, np.asarray(g["actions"][()], np.float32),
                                {k: np.asarray(v[()]) for k, v in g["obs"].items()},
                                {k: (v.item() if hasattr(v, "item") else v) for k, v in g.attrs.items()},
                                json.loads(raw.decode() if isinstance(raw, bytes) else str(raw)))
    except (OSError, KeyError) as e:
        raise DatasetError(f"{path}: cannot read episode {episode} ({e})") from None


@dataclass
class ReplayResult:
    applied: np.ndarray  # (N, A) what the safety layer sent
    observations: list[dict[str, np.ndarray]]  # o_0 .. o_{N-1} seen before each action
    success: bool
    steps: int


def replay_actions(driver: SafeDriver, actions: np.ndarray, seed: int | None, pacer: Pacer | None = None,
                   status: StatusLine | None = None) -> ReplayResult:
    """Reset with ``seed`` and send ``actions`` one per tick (paced by ``pacer``)."""
    driver.reset(seed)
    applied, seen, success = [], [], False
    if pacer is not None:
        pacer.start()
    for t, a in enumerate(actions):
        seen.append(driver.get_observation())
        applied.append(driver.act(a))
        info = driver.step_info()
        success = success or info.success
        if status is not None:
            status.update(f"replay step {t + 1}/{len(actions)}")
        if info.terminated or info.truncated:
            break
        if pacer is not None:
            pacer.wait()
    return ReplayResult(np.asarray(applied, np.float32), seen, success, len(applied))


def run_replay(cfg: ReplayConfig) -> int:
    """CLI entry: replay one episode and compare with the recording."""
    try:
        demo = load_demo(cfg.path, cfg.episode)
    except DatasetError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    env = cfg.task or str(demo.env_args.get("task", ""))
    if cfg.driver == "sim" and not env:
        print("replay: the file names no task; pass task=<name>", file=sys.stderr)
        return 2
    seed = cfg.seed if cfg.seed >= 0 else int(demo.attrs.get("seed", 0))
    tcfg = TeleopConfig(driver=cfg.driver, env=EnvConfig(name=env), realtime=cfg.realtime, time_scale=cfg.time_scale,
                        safety=cfg.safety, driver_args=dict(cfg.driver_args), seed=seed)
    driver = build_driver(tcfg)
    hz = driver.spec.control_hz * cfg.time_scale
    print(f"replaying {cfg.path}:data/{demo.name} ({len(demo.actions)} steps, recorded as "
          f"{demo.attrs.get('label', '?')}) on driver {cfg.driver} at {hz:g} Hz, seed {seed}")
    driver.connect()
    status = StatusLine()
    try:
        r = replay_actions(driver, demo.actions, seed, Pacer(hz), status)
    except KeyboardInterrupt:
        status.message("interrupted")
        return 1
    finally:
        driver.close()
    diff = float(np.abs(r.applied - demo.actions[: r.steps]).max()) if r.steps else 0.0
    status.message(f"replayed {r.steps}/{len(demo.actions)} steps: {'success' if r.success else 'no success'}; "
                   f"max |applied - recorded| = {diff:.3g}; safety held {driver.stats.held}, "
                   f"clipped {driver.stats.clipped}")
    return 0
