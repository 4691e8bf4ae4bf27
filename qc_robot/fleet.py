"""``qc-robot fleet robots=N``: N sim drivers as Ray actors against one ``qc-robot serve``.

Each robot is an ordinary ``drive`` (the same protocol, chunk executor, outbox and clock) in its
own Ray actor process, with its own outbox ``fleet_dir/robot<k>`` and its own seeds. A robot whose
process dies is restarted, up to ``max_restarts`` times, on the same outbox: its unacknowledged
transitions are sent again (the learner applies each ``outbox_seq`` once), its episode ids go on
from the last one begun, and it runs only the episodes it still owes, with the seeds those
episodes would have had. Ray is needed (the ``cluster`` extra); ``ray_address`` as for ``eval``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.safety import SafetyConfig  # noqa: F401  (to_dataclass resolves inherited field types here)

SEED_STRIDE = 1_000_003
"""Robot k's episode i resets with seed + k * SEED_STRIDE + i: robots never share an episode."""


@dataclass
class FleetConfig(DriveConfig):
    """``qc-robot fleet``: ``robots`` sim drivers on Ray actors against one server (every ``drive``
    key applies to each robot; ``episodes`` is per robot)."""

    robots: int = 2
    """How many drivers, each in its own Ray actor process."""
    fleet_dir: str = "runs/fleet"
    """Robot k keeps its outbox in ``fleet_dir/robot<k>`` (a restarted robot picks it up again)."""
    max_restarts: int = 3
    """A robot whose process dies is restarted at most this many times; then the fleet fails."""
    ray_address: str = ""
    """'' = a local Ray instance started in-process (``robots`` CPUs); ``auto`` or
    ``ray://HOST:10001``: a running cluster (its workers need qc-robot and reach ``server``)."""


def robot_config(cfg: FleetConfig, k: int) -> DriveConfig:
    """Robot k's ``drive`` config: its outbox, its seeds, the episodes it still owes."""
    outbox = Path(cfg.fleet_dir) / f"robot{k}"
    begun = episodes_begun(outbox)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DriveConfig)}
    base.update(outbox_dir=str(outbox), seed=cfg.seed + k * SEED_STRIDE + begun,
                episodes=max(0, cfg.episodes - begun))
    return DriveConfig(**base)


def episodes_begun(outbox: Path) -> int:
    """Episodes a robot began with this outbox (a cut one counts: it is not run again)."""
    f = outbox / "episode"
    return int(f.read_text()) + 1 if f.exists() else 0


def _drive(cfg: DriveConfig) -> int:
    from qc_robot.drivers.drive import run_drive

    return run_drive(cfg)


class _Robot:
    def __init__(self) -> None:
        from qc_robot.cli import quiet_known_warnings

        quiet_known_warnings()

    def run(self, drive: Callable[[DriveConfig], int], cfg: DriveConfig) -> int:
        Path(cfg.outbox_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.outbox_dir) / "pid").write_text(str(os.getpid()))
        return drive(cfg)


def run_fleet(cfg: FleetConfig, drive: Callable[[DriveConfig], int] = _drive) -> int:
    """CLI entry: run the fleet; the exit code is the worst robot's (``drive`` runs one robot)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address or None, num_cpus=None if cfg.ray_address else cfg.robots,
                 include_dashboard=False, logging_level=logging.ERROR, configure_logging=False)
    try:
        return _supervise(ray, cfg, drive)
    finally:
        if started:
            ray.shutdown()


def _supervise(ray: Any, cfg: FleetConfig, drive: Callable[[DriveConfig], int]) -> int:
    robot = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_Robot)
    restarts = [0] * cfg.robots
    running: dict[Any, tuple[Any, int]] = {}

    def start(k: int) -> None:
        actor = robot.remote()
        running[actor.run.remote(drive, robot_config(cfg, k))] = (actor, k)

    for k in range(cfg.robots):
        start(k)
    codes = [0] * cfg.robots
    try:
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, k = running.pop(ref)
            try:
                codes[k] = int(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                restarts[k] += 1
                if restarts[k] > cfg.max_restarts:
                    print(f"fleet: robot {k} died {restarts[k]} times; giving up on it ({e})", flush=True)
                    codes[k] = 1
                    continue
                print(f"fleet: robot {k} died; restart {restarts[k]}/{cfg.max_restarts} on its outbox "
                      f"{Path(cfg.fleet_dir) / f'robot{k}'}", flush=True)
                start(k)
                continue
            print(f"fleet: robot {k} done (exit {codes[k]}, restarts {restarts[k]})", flush=True)
    finally:
        for actor, _ in running.values():
            ray.kill(actor)
    return max(codes, default=0)
