"""One learner loop for offline, online and offline→online training.

Offline phase: ``offline_steps`` updates on the dataset. Online phase: ``online_steps`` env steps
in sim, each chunk executed open-loop in full, ``utd`` updates per env step, online transitions
appended to the same replay (the offline data stays in it). Either phase may be 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from qc_robot.agent.agent import QCAgent
from qc_robot.config import TrainConfig
from qc_robot.data.batch import ChunkBatch
from qc_robot.data.replay import ChunkReplay
from qc_robot.data.rewards import FROM_VERDICT, SPARSE, config_convention
from qc_robot.policies.base import ObsField
from qc_robot.train.checkpoint import Checkpoint, config_hash, load_checkpoint, save_checkpoint
from qc_robot.train.evaluate import EvalResult, agent_policy, eval_image_size, evaluate
from qc_robot.train.logs import RunLogger

if TYPE_CHECKING:
    from qc_robot.data.hdf5_io import FlatDataset

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    env_steps: int
    last_eval: EvalResult | None


class TrainSetupError(ValueError):
    """The run cannot start as configured (e.g. data and task disagree); nothing was trained."""


def dataset_of(cfg: TrainConfig) -> FlatDataset:
    from qc_robot.data.hdf5_io import load_flat, vector_obs_keys
    from qc_robot.sim.tasks import task_spec

    sparse = cfg.env.sparse_reward
    if sparse is None:
        sparse = task_spec(cfg.env.name).sparse_default
    d = cfg.data
    keys = list(d.obs_keys) if d.obs_keys is not None else None
    if keys is None:
        keys, skipped = vector_obs_keys(d.path, d.filter_key)
        if skipped:
            print(f"qc-robot train: leaving out image observation keys {skipped} (the agent "
                  f"trains on {keys}); name them in data.obs_keys to train on them with the conv encoder")
    return load_flat(d.path, obs_keys=keys, reward_shift=d.reward_shift, sparse_reward=sparse,
                     filter_key=d.filter_key)


def reward_convention_of(cfg: TrainConfig, data: FlatDataset | None) -> str:
    """Verdict data (a robot's recording) is sparse whatever ``env.sparse_reward`` says: that key
    picks the sim task's reward, which such a file never holds (the env configs set it for every
    task, so it cannot tell a request from a default)."""
    if data is None or data.reward_source != FROM_VERDICT:
        return config_convention(cfg)
    return SPARSE


def _obs_stats(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return observations.mean(axis=0), observations.std(axis=0)


def check_data_matches_task(obs_dim: int, act_dim: int, task_obs: int, task_act: int,
                            data_path: str, task: str) -> None:
    """Raise before any update when the dataset's widths cannot drive the task's env (which
    the online phase and every evaluation step); the message says what differs."""
    problems = [f"{what} width {have} but {task} has {want}"
                for what, have, want in (("observation", obs_dim, task_obs), ("action", act_dim, task_act))
                if have != want]
    if problems:
        raise TrainSetupError(
            f"{data_path}: " + "; ".join(problems) + ". Pick the dataset made for this task (or "
            "data.obs_keys), or set training.online_steps=0 training.eval_episodes=0 to train "
            "offline only without the env.")


class Learner:
    """Owns the agent, the replay, the sim env for online steps, and the run directory."""

    def __init__(self, cfg: TrainConfig) -> None:
        from qc_robot.sim.tasks import task_spec

        self.cfg = cfg
        t = cfg.training
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        self.task = task_spec(cfg.env.name)
        self.run_dir = Path(t.run_dir)
        ckpt_path = self.run_dir / CHECKPOINT
        resume = t.resume and ckpt_path.exists()

        data = dataset_of(cfg) if (t.offline_steps > 0 or Path(cfg.data.path).exists()) else None
        self.has_data = data is not None
        self.reward_convention = reward_convention_of(cfg, data)
        """What the rewards mean (``qc_robot.data.rewards``): stored in the checkpoint; the online
        phase and evaluation run the sim with it."""
        # the rate the data was recorded at (a robot's teleop file says it; datagen's is the task's)
        self.control_hz = float((data.env_args.get("control_hz") if data is not None else None)
                                or self.task.control_hz)
        obs_dim = data.observations.shape[1] if data is not None else self.task.obs_dim
        act_dim = data.actions.shape[1] if data is not None else self.task.act_dim
        self.image_shapes: dict[str, tuple[int, ...]] = (
            {k: tuple(v.shape[1:]) for k, v in data.images.items()} if data is not None else {})
        """Image keys → (H, W, C) of one stored frame (the agent sees C·frame_stack channels)."""
        if t.online_steps > 0 or t.eval_episodes > 0:  # the env will be stepped
            if self.image_shapes and t.online_steps > 0:
                raise TrainSetupError(
                    f"{cfg.data.path}: image keys {list(self.image_shapes)} and online sim steps: the "
                    "learner's online phase records no camera images yet; set training.online_steps=0 "
                    "(evaluation renders the camera; online fine-tuning through serve works)")
            if self.image_shapes and (len(self.image_shapes) > 1 or cfg.agent.vision.frame_stack > 1):
                raise TrainSetupError(
                    f"{cfg.data.path}: evaluation in sim renders one camera without frame stacks; set "
                    "training.eval_episodes=0 and evaluate through serve + drive")
            check_data_matches_task(obs_dim, act_dim, self.task.obs_dim, self.task.act_dim,
                                    cfg.data.path, cfg.env.name)
        k = cfg.agent.vision.frame_stack
        self.agent = QCAgent(cfg.agent, obs_dim, act_dim,
                             image_shapes={key: (*s[:-1], s[-1] * k) for key, s in self.image_shapes.items()})
        if data is not None and cfg.agent.obs_norm == "std":
            self.agent.set_normalizer(*_obs_stats(data.observations), eps=cfg.agent.obs_norm_eps)
        offline_rows = len(data.rewards) if data is not None else 0
        self.replay = ChunkReplay(obs_dim, act_dim, offline_rows + t.online_steps + 1, self.agent.device,
                                  image_shapes=self.image_shapes, frame_stack=k)
        if data is not None:
            self.replay.add_offline(data.as_replay_dict())
        self.sampler = torch.Generator(device=self.agent.device).manual_seed(t.seed)
        self.env_rng = np.random.default_rng(t.seed)
        self.step = 0  # gradient updates
        self.env_steps = 0
        self.logger = RunLogger(self.run_dir, resume=resume)
        self.last_eval: EvalResult | None = None
        self._eval_step = -1
        self._log_t0 = time.perf_counter()
        if resume:
            self._restore(load_checkpoint(ckpt_path, device=str(self.agent.device)))

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            agent=self.agent, config=self.cfg, step=self.step, env_steps=self.env_steps,
            obs_fields=self.obs_fields(),
            action_low=-np.ones(self.agent.act_dim, np.float32),
            action_high=np.ones(self.agent.act_dim, np.float32),
            control_hz=self.control_hz, config_hash=config_hash(self.cfg), reward=self.reward_convention,
            extra={"sampler": self.sampler.get_state(), "online_rows": self.replay.online_state(),
                   "env_rng": self.env_rng.bit_generator.state},
        )

    def obs_fields(self) -> list[ObsField]:
        """What the exported policy takes: the flat float32 'state' (when the data has vector
        keys) and each image key as uint8 (H, W, C·frame_stack), by its own name."""
        fields = [ObsField("state", (self.agent.obs_dim,), "float32")] if self.agent.obs_dim or not \
            self.image_shapes else []
        return fields + [ObsField(k, tuple(s), "uint8") for k, s in self.agent.image_shapes.items()]

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / CHECKPOINT, self.checkpoint())

    def _restore(self, ckpt: Checkpoint) -> None:
        self.agent.load_state_dict(ckpt.agent.state_dict())
        self.step, self.env_steps = ckpt.step, ckpt.env_steps
        self.logger.forget_after(self.step)
        self.sampler.set_state(ckpt.extra["sampler"])
        self.env_rng.bit_generator.state = ckpt.extra["env_rng"]
        online = ckpt.extra["online_rows"]
        # Older checkpoints hold the rows alone (no cursor): a ring that never wrapped.
        self.replay.load_online_state(online if "rows" in online else {"rows": online})
        self.replay.end_episode()  # the interrupted episode ends here; the resumed run starts anew

    # -- phases ------------------------------------------------------------------------------
    def update(self, batch: ChunkBatch | None = None) -> dict[str, torch.Tensor]:
        """One gradient update on ``batch`` (default: a batch sampled from the replay)."""
        a = self.cfg.agent
        if batch is None:
            batch = self.replay.sample(a.batch_size, a.horizon, a.discount, generator=self.sampler)
        self.step += 1
        return self.agent.update(batch)

    def maybe_log(self, info: dict[str, torch.Tensor], phase: str, bar: tqdm | None = None) -> None:
        """Every ``log_interval`` updates: one host sync, a metrics row, the progress bar."""
        t = self.cfg.training
        if not (t.log_interval and self.step % t.log_interval == 0):
            return
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in info.items()}
        metrics["time/updates_per_s"] = t.log_interval / max(now - self._log_t0, 1e-9)
        metrics["env_steps"] = float(self.env_steps)
        self._log_t0 = now
        self.logger.log(self.step, {"phase_online": float(phase == "online"), **metrics})
        if bar is not None:
            bar.set_postfix(critic=f"{metrics.get('critic/loss', float('nan')):.3g}",
                            succ=f"{self.last_eval.success_rate:.2f}" if self.last_eval else "-")

    def train_step(self, phase: str, bar: tqdm | None = None) -> None:
        """One update, then logging and evaluation when they are due."""
        self.maybe_log(self.update(), phase, bar)
        self.maybe_eval(phase)

    def maybe_eval(self, phase: str, force: bool = False) -> None:
        t = self.cfg.training
        due = t.eval_interval and self.step % t.eval_interval == 0
        if (due or force) and t.eval_episodes > 0 and self._eval_step != self.step:
            self._eval_step = self.step
            self.last_eval = evaluate(agent_policy(self.agent, seed=10_000 + self.step), self.cfg.env.name,
                                      t.eval_episodes, seed=10_000, sparse_reward=self.reward_convention == SPARSE,
                                      max_episode_steps=self.cfg.env.max_episode_steps,
                                      image_size=eval_image_size(self.agent), render_fast=self.cfg.env.render_fast)
            self.logger.log_eval(self.step, self.env_steps, phase, self.last_eval.as_dict())
            self.save()
        if t.save_interval and self.step % t.save_interval == 0:
            self.save()

    def add_step(self, obs: np.ndarray, action: np.ndarray, reward: float, terminated: bool, truncated: bool,
                 next_obs: np.ndarray, replay: ChunkReplay | None = None) -> None:
        """Append one env step to ``replay`` (default: the learner's): terminals = the episode ended
        (either way), masks = 1 - true termination."""
        (self.replay if replay is None else replay).add({
            "observations": obs, "actions": action, "rewards": reward, "terminals": float(terminated or truncated),
            "masks": 1.0 - float(terminated), "next_observations": next_obs})

    def run_offline(self) -> None:
        t = self.cfg.training
        remaining = t.offline_steps - self.step
        if remaining <= 0:
            return
        bar = tqdm(total=t.offline_steps, initial=self.step, desc="offline", disable=not t.progress)
        self._log_t0 = time.perf_counter()
        for _ in range(remaining):
            self.train_step("offline", bar)
            bar.update(1)
        bar.close()

    def run_online(self) -> None:
        """Online steps in sim: act once per chunk, append each step, ``utd`` updates per step."""
        from qc_robot.sim.tasks import make_env

        t, a = self.cfg.training, self.cfg.agent
        if self.env_steps >= t.online_steps:
            return
        env = make_env(self.cfg.env.name, sparse_reward=self.reward_convention == SPARSE,
                       max_episode_steps=self.cfg.env.max_episode_steps)
        act_gen = torch.Generator(device=self.agent.device).manual_seed(t.seed + 1 + self.env_steps)
        obs, _ = env.reset(seed=int(self.env_rng.integers(2**31)))
        queue: list[np.ndarray] = []
        bar = tqdm(total=t.online_steps, initial=self.env_steps, desc="online", disable=not t.progress)
        self._log_t0 = time.perf_counter()
        while self.env_steps < t.online_steps:
            if not queue:  # the chunk runs open-loop in full before the next query
                queue = list(self.agent.act(obs[None], generator=act_gen)[0])
            action = queue.pop(0)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            self.add_step(obs, action, reward, terminated, truncated, next_obs)
            self.env_steps += 1
            obs = next_obs
            if terminated or truncated:
                obs, _ = env.reset(seed=int(self.env_rng.integers(2**31)))
                queue = []
            if self.env_steps > t.start_online_updates and self.replay.size >= a.horizon:
                for _ in range(t.utd):
                    self.train_step("online", bar)
            bar.update(1)
        bar.close()
        env.close()

    def run(self) -> TrainResult:
        t = self.cfg.training
        self.run_offline()
        if t.offline_steps > 0 and t.online_steps > 0 and self.env_steps == 0:
            # the offline end point, for offline→online curves (not again when resuming online)
            self.maybe_eval("offline", force=True)
        self.run_online()
        self.maybe_eval("online" if t.online_steps else "offline", force=True)
        self.save()
        self.logger.close()
        return TrainResult(self.run_dir, self.step, self.env_steps, self.last_eval)


def train(cfg: TrainConfig) -> TrainResult:
    return Learner(cfg).run()


def run_train(cfg: TrainConfig) -> int:
    """CLI entry."""
    from qc_robot.data.hdf5_io import DatasetError

    if cfg.training.offline_steps > 0 and not Path(cfg.data.path).exists():
        print(f"qc-robot train: no dataset at {cfg.data.path}. Generate one first:\n"
              f"  qc-robot datagen env={cfg.env.name} data.path={cfg.data.path}")
        return 2
    try:
        result = train(cfg)
    except (TrainSetupError, DatasetError) as e:
        print(f"qc-robot train: {e}")
        return 2
    ev = result.last_eval
    success = f"; success {ev.success_rate:.3f}" if ev else ""
    print(f"done: {result.step} updates, {result.env_steps} env steps{success} → {result.run_dir / CHECKPOINT}")
    return 0
