"""Success rate of a chunked policy in sim, executing each chunk open-loop in full.

The policy is queried only when its queue is empty (once per chunk), unlike the reference loop
that queries every step and discards the answer while a chunk is queued.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ChunkFn = Callable[[np.ndarray], np.ndarray]
"""obs (O,) → chunk (H, A)."""


@dataclass(frozen=True)
class EpisodeOutcome:
    """One evaluation episode: what ``out=FILE`` writes as a CSV row."""

    episode: int
    seed: int
    success: bool
    ret: float
    length: int
    queries: int
    final_obs_crc: int
    """CRC-32 of the last observation's float32 bytes: the same number only for the same trajectory
    end, so two runs of one episode (sequential, on a worker) are checked bit for bit."""


CSV_HEADER = "episode,seed,success,return,length,policy_queries,final_obs_crc"


def outcome_row(o: EpisodeOutcome) -> str:
    return f"{o.episode},{o.seed},{int(o.success)},{o.ret!r},{o.length},{o.queries},{o.final_obs_crc:08x}"


@dataclass
class EvalResult:
    success_rate: float
    mean_return: float
    mean_length: float
    episodes: int
    policy_queries: int
    outcomes: list[EpisodeOutcome] = field(default_factory=list)
    """Per episode, in episode order (the same order whichever worker ran it)."""

    def as_dict(self) -> dict[str, float]:
        return {"eval/success": self.success_rate, "eval/return": self.mean_return,
                "eval/length": self.mean_length}


def summarize(outcomes: list[EpisodeOutcome]) -> EvalResult:
    """Success rate, mean return and length of ``outcomes`` (in order; the means do not depend on it)."""
    return EvalResult(float(np.mean([o.success for o in outcomes])), float(np.mean([o.ret for o in outcomes])),
                      float(np.mean([o.length for o in outcomes])), len(outcomes),
                      sum(o.queries for o in outcomes), list(outcomes))


def run_episode(policy: ChunkFn, env: Any, episode: int, seed: int,
                on_step: Callable[[int, Any], None] | None = None, image_size: int = 0,
                restart_noise: bool = False) -> EpisodeOutcome:
    """One episode from ``env.reset(seed=seed)``. ``restart_noise``: a policy with ``reseed``
    (:func:`agent_policy`) restarts its noise from ``seed`` first, so the episode's outcome depends
    on its seed alone: episodes can run in any process, in any order, and give the same results."""
    reseed = getattr(policy, "reseed", None)
    if restart_noise and reseed is not None:
        reseed(seed)
    obs, _ = env.reset(seed=seed)
    if on_step is not None:
        on_step(episode, env)
    queue: list[np.ndarray] = []
    ret, length, queries, done = 0.0, 0, 0, False
    info: dict = {}
    while not done:
        if not queue:
            queue = list(policy(obs, env.image()) if image_size > 0 else policy(obs))  # type: ignore[call-arg]
            queries += 1
        obs, reward, terminated, truncated, info = env.step(queue.pop(0))
        if on_step is not None:
            on_step(episode, env)
        ret += float(reward)
        length += 1
        done = terminated or truncated
    crc = zlib.crc32(np.ascontiguousarray(obs, dtype=np.float32).tobytes())
    return EpisodeOutcome(episode, seed, bool(info.get("success", False)), ret, length, queries, crc)


def evaluate(policy: ChunkFn, env_name: str, episodes: int, seed: int, sparse_reward: bool | None = None,
             max_episode_steps: int = 0, progress: bool = False,
             on_step: Callable[[int, Any], None] | None = None, image_size: int = 0,
             render_fast: bool = False, restart_noise: bool = False) -> EvalResult:
    """Roll out ``episodes`` episodes with seeds seed, seed+1, ...; success = info['success'] at the end.

    ``on_step(episode, env)`` is called after each reset and each step (a video recorder).
    ``image_size`` > 0: an image policy, called as ``policy(obs, image)`` with the task camera's
    uint8 (S, S, 3) frame, rendered only when the policy is queried (once per chunk)."""
    from tqdm import tqdm

    from qc_robot.sim.tasks import make_env

    env = make_env(env_name, sparse_reward=sparse_reward, max_episode_steps=max_episode_steps,
                   image_size=image_size if image_size > 0 else -1, render_fast=render_fast)
    outcomes = [run_episode(policy, env, ep, seed + ep, on_step, image_size, restart_noise)
                for ep in tqdm(range(episodes), desc="eval", disable=not progress, leave=False)]
    env.close()
    return summarize(outcomes)


@dataclass(frozen=True)
class CheckpointEpisodes:
    """What a worker needs to run episodes of a checkpoint: ``CheckpointEpisodes(...)()`` loads the
    checkpoint, makes the env and returns ``episode i -> outcome``. Plain values only, so it
    travels to Ray actors; ``checkpoint`` must be readable where they run."""

    checkpoint: str
    env_name: str
    seed: int
    sparse_reward: bool | None = None
    max_episode_steps: int = 0
    render_fast: bool = False

    def __call__(self) -> Callable[[int], EpisodeOutcome]:
        from qc_robot.sim.tasks import make_env
        from qc_robot.train.checkpoint import load_checkpoint

        agent = load_checkpoint(self.checkpoint).agent
        size = eval_image_size(agent)
        policy = agent_policy(agent, self.seed)
        env = make_env(self.env_name, sparse_reward=self.sparse_reward, max_episode_steps=self.max_episode_steps,
                       image_size=size if size > 0 else -1, render_fast=self.render_fast)
        return lambda ep: run_episode(policy, env, ep, self.seed + ep, None, size, restart_noise=True)


class _AgentPolicy:
    """A QCAgent as obs -> chunk with its own noise generator (training RNG untouched); ``reseed``
    restarts the noise per episode, from the policy's seed and the episode's."""

    def __init__(self, agent, seed: int) -> None:  # noqa: ANN001 (QCAgent; torch imported lazily)
        import torch

        self.agent, self.seed = agent, seed
        self.gen = torch.Generator(device=agent.device).manual_seed(seed)

    def reseed(self, episode_seed: int) -> None:
        self.gen.manual_seed((self.seed * 1_000_003 + episode_seed) % 2**63)

    def __call__(self, obs: np.ndarray, img: np.ndarray | None = None) -> np.ndarray:
        if self.agent.encoder is not None:  # (obs, frame) -> chunk: the sim renders one camera
            return self.agent.act(obs[None], generator=self.gen, images=[img[None]])[0]  # type: ignore[index]
        return self.agent.act(obs[None], generator=self.gen)[0]


def agent_policy(agent, seed: int = 0) -> ChunkFn:  # noqa: ANN001 (QCAgent; torch imported lazily)
    """Wrap a QCAgent as obs -> chunk (obs, frame -> chunk for an image agent), its noise seeded
    by ``seed`` and, under :func:`run_episode`, restarted per episode."""
    return _AgentPolicy(agent, seed)


def eval_image_size(agent) -> int:  # noqa: ANN001 (QCAgent)
    """The side of the sim camera an image agent needs (0: a state agent). The sim renders one
    square RGB camera; an agent with several cameras or stacked frames cannot be evaluated in it."""
    shapes = list(agent.image_shapes.values())
    if not shapes:
        return 0
    if len(shapes) > 1 or shapes[0][0] != shapes[0][1] or shapes[0][2] != 3:
        raise ValueError(f"in-process evaluation renders one square RGB camera; the agent takes "
                         f"{agent.image_shapes} (evaluate the exported policy with serve + drive)")
    return int(shapes[0][0])


def run_eval(cfg) -> int:  # noqa: ANN001 (EvalConfig)
    """CLI entry: evaluate a checkpoint in its task (or ``env=...``)."""
    from qc_robot.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.checkpoint)
    trained = ckpt.config.env
    name = cfg.env.name or trained.name
    sparse = trained.sparse_reward if cfg.env.sparse_reward is None else cfg.env.sparse_reward
    max_steps = cfg.env.max_episode_steps or trained.max_episode_steps
    label = checkpoint_label(cfg.checkpoint, ckpt)
    print(f"eval: {label}, config {ckpt.config_hash}, saved by qc-robot {ckpt.versions.get('qc_robot', '?')}; "
          f"{cfg.episodes} episodes in {name} from seed {cfg.seed}", flush=True)
    if cfg.workers > 1 or cfg.ray_address:  # Ray actors (preflight checked ray is installed, video off)
        from qc_robot.ray_pool import run_tasks

        job = CheckpointEpisodes(cfg.checkpoint, name, cfg.seed, sparse, max_steps, cfg.env.render_fast)
        recorder = None
        result = summarize(run_tasks(job, cfg.episodes, cfg.workers, address=cfg.ray_address,
                                     progress=cfg.progress, desc="eval"))
    else:
        recorder = _recorder(cfg)
        result = evaluate(agent_policy(ckpt.agent, cfg.seed), name, cfg.episodes, cfg.seed, sparse, max_steps,
                          progress=cfg.progress, on_step=recorder, image_size=eval_image_size(ckpt.agent),
                          render_fast=cfg.env.render_fast, restart_noise=cfg.per_episode_noise)
    if cfg.out:
        write_outcomes(cfg.out, result.outcomes)
    print(f"{name}: success {result.success_rate:.3f} over {result.episodes} episodes "
          f"(return {result.mean_return:.1f}, length {result.mean_length:.0f}, "
          f"{result.policy_queries} policy queries) at update {ckpt.step}")
    print(f"policy: {label}")
    if cfg.out:
        print(f"per-episode results: {cfg.out}")
    if recorder is not None:
        path = recorder.close()
        print(f"video of the first {cfg.video_episodes} episode(s): {path}")
    return 0


def write_outcomes(path: str, outcomes: list[EpisodeOutcome]) -> None:
    """Per-episode results as CSV, one row per episode in episode order."""
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([CSV_HEADER, *map(outcome_row, outcomes)]) + "\n")


def checkpoint_label(path: str, ckpt: Any) -> str:  # ckpt: Checkpoint (torch imported lazily)
    """'runs/a/checkpoint.pt, a model (fql, task cube-single-task1, version step20000-5a0ee3a8)': the
    words ``drive``/``demo`` use for a served policy, so an eval matches the file exported from it."""
    from qc_robot.drivers.policy_id import policy_label
    from qc_robot.policies.onnx_metadata import policy_version

    meta = {"actor_type": ckpt.agent.cfg.actor_type, "task": ckpt.config.env.name,
            "policy_version": policy_version(ckpt.step, ckpt.config_hash), "config_hash": ckpt.config_hash,
            "train_step": ckpt.step}
    return f"{path}, {policy_label(meta)}"


class _EpisodeRecorder:
    """``on_step`` for :func:`evaluate`: frames of the first ``episodes`` episodes into a video."""

    def __init__(self, path: str, episodes: int, every: int) -> None:
        from qc_robot.video import VideoWriter

        self.writer = VideoWriter(path, every=every)
        self.episodes = episodes
        self._ep = -1

    def __call__(self, episode: int, env: Any) -> None:
        from qc_robot.video import render_frame

        if episode >= self.episodes:
            return
        if episode != self._ep:
            self.writer.add_separator()
            self._ep = episode
        self.writer.tick(lambda: render_frame(env))

    def close(self):  # noqa: ANN201 (Path | None)
        return self.writer.close()


def _recorder(cfg) -> _EpisodeRecorder | None:  # noqa: ANN001 (EvalConfig)
    if not getattr(cfg, "video", ""):
        return None
    return _EpisodeRecorder(cfg.video, cfg.video_episodes, cfg.video_every)
