"""Registry of simulated tasks: OGBench manipulation single-task environments under short names.

``cube-double-task2`` maps to OGBench's ``cube-double-play-singletask-task2-v0``. OGBench
builds these environments offline (``make_env_and_datasets(id, env_only=True)``); only the
datasets need a download, and ``qc_robot.sim.datagen`` makes those locally instead.

Facts from the installed ``ogbench`` package (``manipspace/__init__.py``, ``envs/*.py``):
singletask envs use ``success_timing='pre'`` (reward, success and ``terminated`` describe the
state *before* the action), ``terminate_at_goal=True`` and ``permute_blocks=False`` (the goal is
fixed per task). The reward is ``#solved subtasks - #subtasks`` (0 exactly at success). Goal
images are only rendered when ``reset(options={'render_goal': True})`` asks for one, so resets
stay cheap (about 5-12 ms here) and need no GL context.

Visual tasks (``visual-cube-single-task1`` ...) are OGBench's ``visual-*`` envs: the same physics
and task, with the colours OGBench sets for pixel observations (``ob_type='pixels'``: a purple,
partly transparent arm) and 64x64 images from camera ``front_pixels`` by default. Their env still
returns the state vector from ``step`` (so rewards, oracles and labels are unchanged) and images
come from :meth:`TaskEnv.image`, rendered by :class:`qc_robot.sim.camera.SimCamera` exactly as
OGBench renders its pixel observation. Any task can render images (``image_size`` > 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from qc_robot.data.rewards import sparsify

CONTROL_HZ = 20.0  # OGBench manipspace: 0.05 s control step (25 physics substeps of 2 ms)
ACT_DIM = 5  # relative end-effector xyz, yaw, gripper; all in [-1, 1]
NUM_TASKS = 5

# family -> (OGBench env prefix, obs_dim, max_episode_steps, sparse by default in the QC paper)
_FAMILIES: dict[str, tuple[str, int, int, bool]] = {
    "cube-single": ("cube-single", 28, 200, False),
    "cube-double": ("cube-double", 37, 500, False),
    "cube-triple": ("cube-triple", 46, 1000, False),
    "cube-quadruple": ("cube-quadruple", 55, 1000, False),
    "scene": ("scene", 40, 750, True),
    "puzzle-3x3": ("puzzle-3x3", 55, 500, True),
    "puzzle-4x4": ("puzzle-4x4", 83, 500, True),
}
_NAME_RE = re.compile(r"^(?P<visual>visual-)?(?P<family>.+)-task(?P<task>\d+)$")
VISUAL_IMAGE_SIZE = 64  # OGBench's visual_dict: width=height=64


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task; building it needs no simulator."""

    name: str
    """Short name, e.g. ``cube-double-task2``."""
    env_id: str
    """OGBench dataset-style id, e.g. ``cube-double-play-singletask-task2-v0``."""
    dataset_family: str
    """``cube-single``, ``cube-double``, ..., ``scene``, ``puzzle-3x3``."""
    obs_dim: int
    act_dim: int
    control_hz: float
    max_episode_steps: int
    sparse_default: bool
    """The paper's reward setting: sparse for scene and puzzle."""
    task_id: int
    """OGBench evaluation task number (1-5)."""
    play_env_id: str
    """Goal-conditioned env id used in ``data_collection`` mode by datagen, e.g. ``cube-double-v0``
    (``visual-cube-double-v0`` for a visual task)."""
    visual: bool = False
    """OGBench's visual variant: pixel-observation colours, images by default (VISUAL_IMAGE_SIZE)."""

    @property
    def singletask_env_id(self) -> str:
        """The gymnasium id of the evaluation env (``cube-double-singletask-task2-v0``); for a
        visual task the state env of the same task (labels depend on the physics only)."""
        return f"{self.dataset_family}-singletask-task{self.task_id}-v0"

    @property
    def default_image_size(self) -> int:
        """Image side the task renders when none is configured (0: no images)."""
        return VISUAL_IMAGE_SIZE if self.visual else 0


def list_tasks() -> list[str]:
    """All registered short task names (state tasks, then OGBench's visual variants)."""
    names = [f"{fam}-task{i}" for fam in _FAMILIES for i in range(1, NUM_TASKS + 1)]
    return names + [f"visual-{n}" for n in names]


def task_spec(name: str) -> TaskSpec:
    """Spec of task ``name`` (no env is built). Raises ValueError listing the known names."""
    m = _NAME_RE.match(name)
    if m is None or m["family"] not in _FAMILIES or not 1 <= int(m["task"]) <= NUM_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    family, task_id = m["family"], int(m["task"])
    prefix, obs_dim, max_steps, sparse = _FAMILIES[family]
    vis = "visual-" if m["visual"] else ""
    return TaskSpec(
        name=name,
        env_id=f"{vis}{prefix}-play-singletask-task{task_id}-v0",
        dataset_family=family,
        obs_dim=obs_dim,
        act_dim=ACT_DIM,
        control_hz=CONTROL_HZ,
        max_episode_steps=max_steps,
        sparse_default=sparse,
        task_id=task_id,
        play_env_id=f"{vis}{prefix}-v0",
        visual=bool(vis),
    )


def visual_env_kwargs(spec: TaskSpec, image_size: int) -> dict[str, Any]:
    """``gymnasium.make`` keywords for a task that renders ``image_size`` images.

    The offscreen buffer is the env's render size (OGBench: 64 on visual envs, 200 otherwise), so
    it is raised when needed. Visual envs skip gymnasium's env checker: it reads
    ``observation_space``, which resets the env and renders a frame before
    :func:`use_state_observations` can switch the env to state observations.
    """
    kw: dict[str, Any] = {}
    if spec.visual or image_size > 200:
        side = max(image_size, VISUAL_IMAGE_SIZE if spec.visual else 200)
        kw.update(width=side, height=side)
    if spec.visual:
        kw["disable_env_checker"] = True
    return kw


def use_state_observations(env: Any) -> None:
    """Make an (unwrapped) OGBench env return its state vector even in pixel mode.

    OGBench's visual envs build the pixel colours from ``ob_type='pixels'`` and then render a
    frame inside every ``reset``/``step`` (on the calling thread, at the env's size). We keep the
    colours but take images from our own camera, once per step and on its own GL thread: the
    instance's ``compute_observation`` runs OGBench's state branch instead.
    """
    if getattr(env, "_ob_type", "states") != "pixels":
        return
    cls_compute = type(env).compute_observation

    def state_observation() -> np.ndarray:
        env._ob_type = "states"
        try:
            return cls_compute(env)
        finally:
            env._ob_type = "pixels"

    env.compute_observation = state_observation


class TaskEnv(gymnasium.Wrapper):
    """Uniform step API over an OGBench singletask env.

    ``step`` returns ``(obs float64 (obs_dim,), reward float, terminated, truncated, info)`` with
    ``info['success']`` a bool. The first ``reset`` without a seed uses the seed given here, so
    a seeded env replays the same episode sequence.
    """

    def __init__(
        self, env: gymnasium.Env, spec: TaskSpec, sparse_reward: bool, seed: int | None,
        image_size: int = 0, camera: str = "", render_fast: bool = False,
    ) -> None:
        super().__init__(env)
        self.task = spec
        self.sparse_reward = sparse_reward
        self._pending_seed = seed
        self.image_size = image_size
        """Side of the square images :meth:`image` renders (0: this env renders none)."""
        self.camera_name = camera
        self.render_fast = render_fast
        self._camera: Any = None
        use_state_observations(env.unwrapped)

    def image(self) -> np.ndarray:
        """The current state through the task camera: uint8 (image_size, image_size, 3) RGB.

        Renders on the camera's own GL thread (35-700 ms a frame on this CPU, see
        benchmarks/bench_camera.py); call it once per step. ValueError when ``image_size`` is 0.
        """
        if self.image_size <= 0:
            raise ValueError(f"{self.task.name}: built without images (image_size=0)")
        if self._camera is None:
            from qc_robot.sim.camera import DEFAULT_CAMERA, SimCamera

            self._camera = SimCamera(self.env.unwrapped, self.image_size, self.image_size,
                                     self.camera_name or DEFAULT_CAMERA, self.render_fast)
        return self._camera.render()

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()
            self._camera = None
        super().close()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        obs, info = self.env.reset(seed=seed, options=options)
        return np.asarray(obs, dtype=np.float64), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        r = float(reward)
        if self.sparse_reward:
            r = float(sparsify(r))
        info["success"] = bool(info.get("success", False))
        return np.asarray(obs, dtype=np.float64), r, bool(terminated), bool(truncated), info


def make_env(
    name: str,
    sparse_reward: bool | None = None,
    max_episode_steps: int = 0,
    seed: int | None = None,
    image_size: int = -1,
    camera: str = "",
    render_fast: bool = False,
) -> TaskEnv:
    """Build the evaluation env of task ``name``.

    ``sparse_reward=None`` uses the task's paper default; ``max_episode_steps=0`` keeps the
    task's own limit. The episode terminates on success (OGBench singletask behaviour).
    ``image_size``: side of the square images :meth:`TaskEnv.image` renders (-1: the task's
    default, 64 for visual tasks and none otherwise; 0: none); ``camera`` ('' = ``front_pixels``)
    and ``render_fast`` as in :class:`qc_robot.sim.camera.SimCamera`.
    """
    spec = task_spec(name)
    size = spec.default_image_size if image_size < 0 else image_size
    if size > 0:
        from qc_robot.video import use_offscreen_gl

        use_offscreen_gl()  # before mujoco's first import picks its GL backend
    import ogbench  # heavy import (mujoco, dm_control): only when an env is needed

    limit = max_episode_steps if max_episode_steps > 0 else spec.max_episode_steps
    env = ogbench.make_env_and_datasets(spec.env_id, env_only=True, max_episode_steps=limit,
                                        **visual_env_kwargs(spec, size))
    sparse = spec.sparse_default if sparse_reward is None else sparse_reward
    return TaskEnv(env, spec, sparse, seed, size, camera, render_fast)
