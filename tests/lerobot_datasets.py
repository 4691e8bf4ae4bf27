"""Small LeRobotDatasets written by LeRobot's own writer (``LeRobotDataset.create``, ``add_frame``,
``save_episode``), for the import/export tests. LeRobot 0.3.x writes its v2.1 layout, 0.4.x v3.0.

The numbers make mix-ups visible: episode e, frame t has state ``100 e + t + j/10`` in joint j,
action ``-(10 e + t) - j``, a camera frame of the uniform grey ``10 t + 60 e``, a reward of 1 and a
success on the last frame of even episodes only, and the task ``"task e"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lerobot_env import torchvision_python

JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos", "gripper.pos"]
LENGTHS = [5, 6, 7]
FPS = 10
CAMERA = (24, 32, 3)


def state(e: int, t: int) -> np.ndarray:
    return (100.0 * e + t + np.arange(len(JOINTS)) / 10).astype(np.float32)


def action(e: int, t: int) -> np.ndarray:
    return (-(10.0 * e + t) - np.arange(len(JOINTS))).astype(np.float32)


def grey(e: int, t: int) -> int:
    return 10 * t + 60 * e


def lerobot_dataset_class() -> Any:
    """LeRobot's ``LeRobotDataset`` or a skip that says what is missing."""
    pytest.importorskip("pyarrow", reason="qc-robot[lerobot-data] not installed")
    pytest.importorskip("av", reason="qc-robot[lerobot-data] not installed")
    pytest.importorskip("lerobot", reason="LeRobot not installed (docs/lerobot.md)")
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        pytest.skip("LeRobot's writer converts (1,)-shaped values with float(), which numpy >= 2.4 refuses: "
                    "install numpy<2.4 beside LeRobot (.ci/run does)")
    torchvision_python()
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as e:
        pytest.skip(f"LeRobot's dataset stack is not installed ({e}; .ci/run lists it)")
    return LeRobotDataset


def make_dataset(root: Path, camera: str = "", rewards: bool = True, lengths: list[int] | None = None,
                 values: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """A LeRobotDataset at ``root`` written by LeRobot. ``camera``: '' (none), 'video' or 'image';
    ``values(e, t)``: (state, action) of episode e, frame t instead of the mix-up-revealing numbers."""
    cls = lerobot_dataset_class()
    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": (len(JOINTS),), "names": JOINTS},
        "action": {"dtype": "float32", "shape": (len(JOINTS),), "names": JOINTS}}
    if rewards:
        features["next.reward"] = {"dtype": "float32", "shape": (1,), "names": None}
        features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    if camera:
        features["observation.images.front"] = {"dtype": camera, "shape": CAMERA,
                                                "names": ["height", "width", "channels"]}
    ds = cls.create("local/qc-robot-test", fps=FPS, features=features, root=root, robot_type="so101_follower",
                    use_videos=camera == "video")
    task_arg = "task" in inspect.signature(ds.add_frame).parameters
    for e, n in enumerate(lengths or LENGTHS):
        for t in range(n):
            st, act = values(e, t) if values else (state(e, t), action(e, t))
            frame: dict[str, Any] = {"observation.state": st, "action": act}
            if rewards:
                last = t == n - 1 and e % 2 == 0
                frame["next.reward"] = np.array([float(last)], np.float32)
                frame["next.success"] = np.array([last])
            if camera:
                frame["observation.images.front"] = np.full(CAMERA, grey(e, t), np.uint8)
            if task_arg:
                ds.add_frame(frame, task=f"task {e}")
            else:
                ds.add_frame({**frame, "task": f"task {e}"})
        ds.save_episode()
    if hasattr(ds, "finalize"):
        ds.finalize()
    return root
