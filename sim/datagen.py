"""OGBench-style play data from the package's scripted oracles, labelled for one evaluation task.

Recipe (facts from OGBench's ``data_gen_scripts/generate_manipspace.py``, which the pip package
does not ship): the goal-conditioned env in ``mode='data_collection'`` with
``terminate_at_goal=False``; ``PlanOracle`` agents (cube / button / drawer / window) with
temporally smoothed plan noise (``noise``, ``noise_smoothing=0.5``); whenever the oracle reports
``done`` the env draws a new random target (``set_new_target(p_stack=...)``) and the oracle for
that target's kind takes over. Puzzle uses the button oracle with the gripper kept closed; scene
episodes where the cube leaves the visible table are regenerated (the script's health check).

Labels mirror ``ogbench.relabel_utils.relabel_dataset`` (used by ``make_env_and_datasets`` for
every ``*-singletask-*`` dataset), which we call directly on each episode's pre-action MuJoCo
state (``info['prev_qpos']``, ``info['prev_button_states']``): per subtask success (cube within
0.04 of its target, buttons equal, drawer/window within 0.04), ``reward = #solved - #subtasks``
and ``mask = 1 - all(solved)``. That is exactly what the singletask env returns on the same
state (``success_timing='pre'``). We store ``dones = 1 - mask``: the true-termination flag.
Every episode ends at ``episode_length`` (a time limit, not a termination).

With ``image_size`` > 0 (by default on the visual-* tasks, OGBench's 64) every step's camera
image is recorded too, ``obs/<image_key>`` and ``next_obs/<image_key>`` uint8 (N, S, S, 3),
rendered by :class:`qc_robot.sim.camera.SimCamera` from the same pre-action state as ``obs/state``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from qc_robot.config import DatagenConfig
from qc_robot.data.hdf5_io import EpisodeWriter, load_flat
from qc_robot.sim.tasks import TaskSpec, task_spec, use_state_observations, visual_env_kwargs

NOISE_SMOOTHING = 0.5  # OGBench's default for PlanOracle play data


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """OGBench oracles draw from the global ``np.random``: seed it, then restore the caller's state."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def _p_stack(family: str, rng: np.random.Generator) -> float:
    """Per-episode stacking probability for cube targets (OGBench's schedule)."""
    if family == "cube-single":
        return 0.0
    ranges = {"cube-double": (0.0, 0.25), "cube-triple": (0.05, 0.35), "cube-quadruple": (0.1, 0.5)}
    if family in ranges:
        return float(rng.uniform(*ranges[family]))
    return 0.5


def _make_oracles(spec: TaskSpec, env: Any, noise: float) -> dict[str, Any]:
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    kw = dict(env=env, noise=noise, noise_smoothing=NOISE_SMOOTHING)
    if spec.dataset_family.startswith("cube"):
        return {"cube": CubePlanOracle(**kw)}
    if spec.dataset_family == "scene":
        return {
            "cube": CubePlanOracle(**kw),
            "button": ButtonPlanOracle(**kw),
            "drawer": DrawerPlanOracle(**kw),
            "window": WindowPlanOracle(**kw),
        }
    if spec.dataset_family.startswith("puzzle"):
        return {"button": ButtonPlanOracle(gripper_always_closed=True, **kw)}
    raise NotImplementedError(f"no scripted oracle for task family {spec.dataset_family!r}")


def _scene_healthy(qpos: np.ndarray) -> bool:
    """OGBench's scene check: the cube never leaves the table except into the drawer."""
    xyz = qpos[:, 14:17]  # (N, 3) first cube's position
    too_right = (xyz[:, 1] >= 0.29).any()
    too_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_right or too_left)


def _task_goal_target(env: Any, goals: np.ndarray, rng: np.random.Generator) -> tuple[Any, Any] | None:
    """Point the cube oracle at the evaluation task's goal for one cube not yet there.

    Uses the cube env's data-collection target (the same mocap target ``set_new_target`` moves),
    so the oracle and the recorded observation see an ordinary play target. None when every
    cube already sits at its goal.
    """
    xyz = np.array([env._data.joint(f"object_joint_{i}").qpos[:3] for i in range(len(goals))])
    away = [i for i in range(len(goals)) if np.linalg.norm(xyz[i] - goals[i]) > 0.04]
    if not away:
        return None
    block = int(rng.choice(away))
    env._target_block = block
    for i, mocap in enumerate(env._cube_target_mocap_ids):
        env._data.mocap_pos[mocap] = goals[i] if i == block else (0.0, 0.0, -0.3)
    return env.compute_observation(), env.get_reset_info()


def _rollout(
    env: Any,
    oracles: dict[str, Any],
    length: int,
    p_stack: float,
    reset_seed: int | None,
    task_goals: np.ndarray | None = None,
    task_goal_prob: float = 0.0,
    rng: np.random.Generator | None = None,
    camera: Any = None,
) -> dict[str, np.ndarray]:
    """One play episode of ``length`` steps; arrays of the pre-action state per step.

    With ``task_goals`` (cube tasks), each new target is, with probability ``task_goal_prob``,
    one of the evaluation task's goals instead of a random one ("task-directed play").
    With a ``camera`` (:class:`~qc_robot.sim.camera.SimCamera`), ``frames`` holds the N + 1
    images of the visited states (N + 1: the last is the final next observation).
    """
    ob, info = env.reset(seed=reset_seed)
    frames = [camera.render()] if camera is not None else []
    agent = oracles[info["privileged/target_task"]]
    agent.reset(ob, info)
    obs, next_obs, actions, qpos, qvel, buttons = [], [], [], [], [], []
    for _ in range(length):
        action = np.clip(np.asarray(agent.select_action(ob, info), dtype=np.float64), -1.0, 1.0)
        next_ob, _, _, _, info = env.step(action)
        if camera is not None:
            frames.append(camera.render())  # the state after the action, before a new target is set
        if agent.done:
            # New random target whenever the current one is handled (OGBench's play recipe).
            agent_ob, agent_info = env.set_new_target(p_stack=p_stack)
            if task_goals is not None and rng is not None and rng.uniform() < task_goal_prob:
                directed = _task_goal_target(env, task_goals, rng)
                if directed is not None:
                    agent_ob, agent_info = directed
            agent = oracles[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        obs.append(ob)
        next_obs.append(next_ob)
        actions.append(action)
        qpos.append(info["prev_qpos"])
        qvel.append(info["prev_qvel"])
        if "prev_button_states" in info:
            buttons.append(info["prev_button_states"])
        ob = next_ob
    out = {
        "obs": np.asarray(obs, dtype=np.float32),  # (N, O)
        "next_obs": np.asarray(next_obs, dtype=np.float32),  # (N, O)
        "actions": np.asarray(actions, dtype=np.float32),  # (N, 5)
        "qpos": np.asarray(qpos),  # (N, nq)
        "qvel": np.asarray(qvel),  # (N, nv)
    }
    if buttons:
        out["button_states"] = np.asarray(buttons, dtype=np.int64)  # (N, num_buttons)
    if frames:
        out["frames"] = np.stack(frames)  # (N + 1, S, S, 3) uint8
    return out


def label_episode(
    spec: TaskSpec, label_env: Any, qpos: np.ndarray, button_states: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, dones) of the evaluation task for per-step states, via OGBench's own relabeller."""
    from ogbench.relabel_utils import relabel_dataset

    ds: dict[str, np.ndarray] = {"qpos": qpos}
    if button_states is not None:
        ds["button_states"] = button_states
    relabel_dataset(spec.singletask_env_id, label_env, ds)
    return ds["rewards"].astype(np.float32), (1.0 - ds["masks"]).astype(np.float32)


@dataclass
class Episode:
    """One generated episode, as :meth:`EpisodeWriter.add_episode` takes it (plain arrays, so a
    Ray worker can return it to the process that writes the file)."""

    obs: dict[str, np.ndarray]
    next_obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    attrs: dict[str, Any]
    extras: dict[str, np.ndarray]

    def write(self, writer: EpisodeWriter) -> None:
        writer.add_episode(obs=self.obs, actions=self.actions, rewards=self.rewards, dones=self.dones,
                           next_obs=self.next_obs, attrs=self.attrs, extras=self.extras)


def episode_seed(seed: int, ep: int) -> int:
    """Per-episode mode: the seed of episode ``ep`` (env reset, ``np.random``, the p_stack and
    task-goal draws). Hashed from both numbers, so datasets of nearby seeds share no episode."""
    return int(np.random.SeedSequence((seed, ep)).generate_state(1)[0])


class _PlaySim:
    """The play env, its oracles, the labelling env and the optional camera for one task."""

    def __init__(self, job: DatagenJob) -> None:
        if job.image_size > 0:
            from qc_robot.video import use_offscreen_gl

            use_offscreen_gl()  # before mujoco's first import picks its GL backend
        import gymnasium
        import ogbench  # noqa: F401  (registers the envs)

        self.job, self.spec = job, task_spec(job.task)
        self.env = gymnasium.make(self.spec.play_env_id, terminate_at_goal=False, mode="data_collection",
                                  **visual_env_kwargs(self.spec, job.image_size)).unwrapped
        use_state_observations(self.env)  # visual envs: keep the state observation, images come from cam
        self.cam = None
        if job.image_size > 0:
            from qc_robot.sim.camera import DEFAULT_CAMERA, SimCamera

            self.cam = SimCamera(self.env, job.image_size, job.image_size, job.camera or DEFAULT_CAMERA,
                                 job.render_fast)
        self.oracles = _make_oracles(self.spec, self.env, job.noise)
        self.label_env = gymnasium.make(self.spec.singletask_env_id)
        self.task_goals = None
        if job.task_goal_prob > 0:
            infos = self.label_env.unwrapped.task_infos  # type: ignore[attr-defined]
            self.task_goals = np.asarray(infos[self.spec.task_id - 1]["goal_xyzs"])  # (cubes, 3)

    def episode(self, ep: int, rng: np.random.Generator, reset_seed: int | None) -> Episode:
        """Episode ``ep`` drawn from ``rng`` and the global ``np.random`` as they stand; the env
        resets with ``reset_seed`` (None: its own stream goes on)."""
        job, spec = self.job, self.spec
        while True:
            p_stack = _p_stack(spec.dataset_family, rng)
            roll = _rollout(self.env, self.oracles, job.episode_length, p_stack, reset_seed,
                            self.task_goals, job.task_goal_prob, rng, self.cam)
            reset_seed = None  # a regenerated scene episode goes on from the env's stream
            if spec.dataset_family != "scene" or _scene_healthy(roll["qpos"]):
                break
        rewards, dones = label_episode(spec, self.label_env, roll["qpos"], roll.get("button_states"))
        extras: dict[str, np.ndarray] = {}
        if job.save_states:
            extras["states"] = np.concatenate([roll["qpos"], roll["qvel"]], axis=1)  # (N, nq+nv)
            if "button_states" in roll:
                extras["button_states"] = roll["button_states"]
        obs, next_obs = {"state": roll["obs"]}, {"state": roll["next_obs"]}
        if self.cam is not None:
            obs[job.image_key], next_obs[job.image_key] = roll["frames"][:-1], roll["frames"][1:]
        attrs = {"episode": ep, "p_stack": p_stack, "nq": roll["qpos"].shape[1]}
        return Episode(obs, next_obs, roll["actions"], rewards, dones, attrs, extras)

    def seeded_episode(self, ep: int) -> Episode:
        """Per-episode mode: episode ``ep`` from :func:`episode_seed` alone, whatever ran before."""
        s = episode_seed(self.job.seed, ep)
        with _seeded_global_numpy(s):
            out = self.episode(ep, np.random.default_rng(s), s)
        out.attrs["episode_seed"] = s
        return out

    def close(self) -> None:
        if self.cam is not None:
            self.cam.close()
        self.env.close()
        self.label_env.close()


@dataclass(frozen=True)
class DatagenJob:
    """What makes a dataset's episodes, in plain values (it travels to Ray actors): called, it
    builds the sim and returns ``episode i -> Episode`` in per-episode mode."""

    task: str
    episode_length: int
    noise: float
    seed: int
    save_states: bool = True
    task_goal_prob: float = 0.0
    image_size: int = 0
    """Resolved: 0 = no images."""
    image_key: str = "image"
    camera: str = ""
    render_fast: bool = False

    def __call__(self) -> Callable[[int], Episode]:
        return _PlaySim(self).seeded_episode

    def env_args(self, per_episode_seed: bool) -> dict[str, Any]:
        """The file's ``data.attrs['env_args']`` (the default mode's keys unchanged)."""
        spec = task_spec(self.task)
        size = self.image_size
        args: dict[str, Any] = {
            "task": spec.name,
            "env_id": spec.env_id,
            "singletask_env_id": spec.singletask_env_id,
            "play_env_id": spec.play_env_id,
            "control_hz": spec.control_hz,
            "obs_keys": ["state"] + ([self.image_key] if size > 0 else []),
            "obs_dim": spec.obs_dim,
            "act_dim": spec.act_dim,
            "source": "qc-robot datagen (ogbench PlanOracle play data)",
            "noise": self.noise,
            "noise_smoothing": NOISE_SMOOTHING,
            "seed": self.seed,
            "episode_length": self.episode_length,
            "reward": "ogbench singletask: #solved subtasks - #subtasks, on the pre-action state; dones = success",
            "sparse_reward": False,
            "task_goal_prob": self.task_goal_prob,
        }
        if size > 0:
            args.update(image_size=size, image_key=self.image_key, camera=self.camera or "front_pixels",
                        render_fast=self.render_fast, visual=spec.visual)
        if per_episode_seed:  # only then: default-mode files keep their metadata byte for byte
            args["seeding"] = "per_episode"
        return args


def _stream_episodes(job: DatagenJob, num_episodes: int) -> Generator[Episode, None, None]:
    """The default mode: every episode from one stream seeded once (``np.random`` included), the
    env reset with the seed only before episode 0. The published datasets were made this way."""
    sim = _PlaySim(job)
    rng = np.random.default_rng(job.seed)
    try:
        with _seeded_global_numpy(job.seed):
            for ep in range(num_episodes):
                yield sim.episode(ep, rng, job.seed if ep == 0 else None)
    finally:
        sim.close()


def _seeded_episodes(job: DatagenJob, num_episodes: int) -> Generator[Episode, None, None]:
    """Per-episode mode in this process: the same episodes Ray workers make."""
    sim = _PlaySim(job)
    try:
        for ep in range(num_episodes):
            yield sim.seeded_episode(ep)
    finally:
        sim.close()


def write_episodes(out_path: str, env_args: dict[str, Any], episodes: Generator[Episode, None, None],
                   total_steps: int, progress: bool = False, desc: str = "datagen") -> None:
    """Write ``episodes`` in the order they come into a new file at ``out_path`` (this process is
    the file's only writer, wherever the episodes were made)."""
    # closing: a failed write ends the episode source at once (the sim closed, np.random
    # restored, Ray's actors stopped), not whenever the generator is collected
    with contextlib.closing(episodes), EpisodeWriter(out_path, env_args, mode="w") as writer:
        bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress)
        for episode in episodes:
            episode.write(writer)
            bar.update(len(episode.actions))
        bar.close()


def generate(
    task: str,
    num_episodes: int,
    episode_length: int,
    noise: float,
    seed: int,
    out_path: str,
    progress: bool = True,
    save_states: bool = True,
    task_goal_prob: float = 0.0,
    image_size: int = -1,
    image_key: str = "image",
    camera: str = "",
    render_fast: bool = False,
    per_episode_seed: bool = False,
    workers: int = 1,
    ray_address: str = "",
) -> str:
    """Generate ``num_episodes`` play episodes of ``episode_length`` steps into ``out_path``.

    Deterministic given ``seed``. Rewards and ``dones`` belong to ``task``'s evaluation goal, so
    one file trains one task. ``save_states`` also stores robomimic-style ``states`` (qpos|qvel
    of the observed state) and, for scene/puzzle, ``button_states``, so labels can be re-checked.
    ``task_goal_prob`` > 0 (cube tasks only) makes that fraction of the oracle's targets the
    evaluation task's goals: small play datasets otherwise rarely contain a solved task.
    ``image_size`` (-1: the task's default, 64 on visual-* tasks, else none; 0: none) records the
    camera image of every step under ``image_key`` (``camera`` '' = ``front_pixels``; rendering
    costs 35-700 ms a frame here, so image datasets are small).
    ``per_episode_seed``: episode i is drawn from :func:`episode_seed` (seed, i) alone instead of
    from one stream across episodes (the default); ``workers`` > 1 or a ``ray_address`` makes the
    episodes on Ray actors, always in that mode, and writes them here in episode order, so the
    file equals ``workers=1, per_episode_seed=True``'s. Returns ``out_path``.
    """
    spec = task_spec(task)
    if num_episodes <= 0 or episode_length <= 0:
        raise ValueError("num_episodes and episode_length must be positive")
    size = spec.default_image_size if image_size < 0 else image_size
    if size > 0 and image_key == "state":
        raise ValueError("image_key must differ from the state key 'state'")
    if task_goal_prob > 0 and not spec.dataset_family.startswith("cube"):
        raise ValueError(f"task_goal_prob is only supported for cube tasks, not {spec.name}")
    job = DatagenJob(spec.name, episode_length, noise, seed, save_states, task_goal_prob, size, image_key,
                     camera, render_fast)
    on_ray = workers > 1 or bool(ray_address)
    per_episode_seed = per_episode_seed or on_ray
    episodes: Generator[Episode, None, None]
    if on_ray:
        from qc_robot.ray_pool import iter_tasks

        episodes = iter_tasks(job, num_episodes, workers, address=ray_address, progress=progress,
                              desc=f"datagen {task} (episodes)")
    else:
        episodes = (_seeded_episodes if per_episode_seed else _stream_episodes)(job, num_episodes)
    write_episodes(out_path, job.env_args(per_episode_seed), episodes, num_episodes * episode_length,
                   progress=progress and not on_ray, desc=f"datagen {task}")
    return out_path


def run_datagen(cfg: DatagenConfig) -> int:
    """CLI entry of ``qc-robot datagen``: generate the dataset, print a summary, return 0."""
    path = cfg.data.path.replace("${env.name}", cfg.env.name)
    start = time.perf_counter()
    generate(
        cfg.env.name,
        num_episodes=cfg.data.num_episodes,
        episode_length=cfg.data.episode_length,
        noise=cfg.data.noise,
        seed=cfg.data.seed,
        out_path=path,
        progress=cfg.progress,
        task_goal_prob=cfg.data.task_goal_prob,
        image_size=cfg.env.image_size,
        image_key=cfg.env.image_key,
        camera=cfg.env.camera,
        render_fast=cfg.env.render_fast,
        per_episode_seed=cfg.data.per_episode_seed,
        workers=cfg.workers,
        ray_address=cfg.ray_address,
    )
    elapsed = time.perf_counter() - start
    ds = load_flat(path, obs_keys=["state"])  # the summary needs no pixels
    n = len(ds)
    print(
        f"datagen {cfg.env.name}: {len(ds.episode_ends)} episodes, {n} transitions "
        f"({n / max(elapsed, 1e-9):.0f} steps/s), success-label rate {float(np.mean(1.0 - ds.masks)):.4f}, "
        f"mean reward {float(np.mean(ds.rewards)):.3f} -> {os.path.abspath(path)}"
    )
    return 0
