"""Configuration of ``qc-robot teleop``, ``replay`` and ``dataset`` (schemas of configs/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from qc_robot.config import EnvConfig
from qc_robot.drivers.safety import SafetyConfig


@dataclass
class TeleopConfig:
    """Drive a robot from a teleop device through the safety layer and record episodes."""

    driver: str = "sim"
    """Registered driver name (qc_robot.drivers.registry)."""
    env: EnvConfig = field(default_factory=lambda: EnvConfig(name="cube-double-task2"))
    """sim: the task (config group ``env``: ``env=cube-single-task1``)."""
    device: str = "keyboard"
    """'keyboard', 'gamepad' (evdev), 'spacemouse' (pyspacemouse), 'lerobot' (a LeRobot leader arm,
    driver=lerobot) or 'scripted' (OGBench oracle, sim)."""
    device_args: dict[str, Any] = field(default_factory=dict)
    """device=lerobot: ``teleop_type`` (e.g. so101_leader) and ``teleop_args`` (port, id, ...)."""
    out: str = "demos.hdf5"
    """HDF5 file the episodes are appended to (created if missing; a leftover journal is recovered)."""
    episodes: int = 0
    """Stop after this many saved episodes (0: until quit)."""
    max_steps: int = 0
    """Steps after which an episode ends as a failure (0: the driver's episode limit)."""
    speed: float = 0.5
    """Fraction of the full action range a key/stick commands."""
    operator: str = ""
    """Who is teleoperating (stored on every episode; default: $USER)."""
    calibration_id: str = ""
    """Calibration the driver runs with ('' if none; a driver's own ``calibration_id`` wins)."""
    seed: int = 0
    """Episode i of the file resets with seed + i."""
    realtime: bool = True
    """sim: wall-clock robot (True) or lockstep (False)."""
    time_scale: float = 1.0
    """Speed-up of the control clock (tests: large, with realtime=false)."""
    commit: str = "atomic"
    """'atomic' (copy, append, rename: a crash never damages the file) or 'inplace' (no copy)."""
    fsync: bool = False
    """Force every journal frame to disk (survives power loss; a kill -9 is survived either way)."""
    oracle: str = "markov"
    """scripted: OGBench cube oracle, 'markov' or 'plan'."""
    oracle_noise: float = 0.0
    """scripted, plan oracle: action noise."""
    outcomes: list[str] = field(default_factory=list)
    """scripted: verdict per episode ('auto', 'success', 'failure', 'discard'); [] = all auto."""
    end_after: int = 20
    """scripted: steps before a scripted verdict key is pressed."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    driver_args: dict[str, Any] = field(default_factory=dict)
    """Further driver-specific config keys."""
    cameras: list[dict[str, Any]] = field(default_factory=list)
    """Cameras recorded with every step (``qc_robot.drivers.camera.CameraConfig`` maps, as in
    ``qc-robot drive``); their frames go to ``obs/<name>`` uint8 (T, H, W, 3)."""
    status: bool = True
    """Redraw a status line in place when stdout is a terminal."""


@dataclass
class ReplayConfig:
    """Play a recorded episode back through a driver and the safety layer."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("path",)
    path: str = "???"
    """The HDF5 file."""
    episode: int = 0
    """Demo index (data/demo_<episode>)."""
    driver: str = "sim"
    task: str = ""
    """sim: the task ('' = the file's env_args['task'])."""
    seed: int = -1
    """Reset seed (-1: the episode's recorded attrs['seed'] if any)."""
    realtime: bool = True
    time_scale: float = 1.0
    """1 = the control rate the episode was recorded at; 2 = twice as fast."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    driver_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """Inspect and edit episode files: ``qc-robot dataset ACTION PATH... [key=value]``."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("action", "paths")
    action: str = "info"
    """'info', 'validate', 'merge' (paths... → out), 'split' (writes mask/<train>, mask/<valid>), 'recover',
    'label' (FILE DEMO success|failure: the verdict of a demo, e.g. a recovered 'unlabelled' one),
    'import' (a local LeRobotDataset FOLDER → out=FILE.hdf5), 'export' (FILE.hdf5 → out=FOLDER, a
    LeRobotDataset written by LeRobot's own writer: docs/lerobot.md)."""
    paths: list[str] = field(default_factory=list)
    """Input files."""
    out: str = ""
    """merge, import: the output file; export: the LeRobotDataset folder to create."""
    ratio: float = 0.9
    """split: fraction of demos in the train filter."""
    seed: int = 0
    """split: shuffle seed."""
    train_key: str = "train"
    valid_key: str = "valid"
    only_success: bool = False
    """split: put only successful demos into the filters."""
    image_size: int = 64
    """import: side of the square camera frames decoded from the dataset's videos (0: as recorded)."""
    label: str = "success"
    """import: the verdict of episodes the dataset does not judge (no next.reward, no next.success
    column: LeRobot's plain recordings), 'success' or 'failure'."""
    normalize: bool = True
    """import: scale actions (and the state dimensions named like them) onto [-1, 1] from the
    dataset's own range, kept in the file so export and driver=lerobot undo it."""
    use_videos: bool = True
    """export: cameras as MP4 videos (LeRobot's default); false: PNG frames, lossless."""
    repo_id: str = ""
    """export: the dataset's LeRobot repo id ('' : local/<out folder name>)."""
    fps: float = 0.0
    """export: frames per second (0: the file's control_hz)."""
