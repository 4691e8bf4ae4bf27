"""Success rate of a chunked policy in sim, executing each chunk open-loop in full.

The policy is queried only when its queue is empty (once per chunk), unlike the reference loop
that queries every step and discards the answer while a chunk is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ChunkFn = Callable[[np.ndarray], np.ndarray]
"""obs (O,) → chunk (H, A)."""


@dataclass
class EvalResult:
    success_rate: float
    mean_return: float
    mean_length: float
    episodes: int
    policy_queries: int

    def as_dict(self) -> dict[str, float]:
        return {"eval/success": self.success_rate, "eval/return": self.mean_return,
                "eval/length": self.mean_length}


def evaluate(policy: ChunkFn, env_name: str, episodes: int, seed: int, sparse_reward: bool | None = None,
             max_episode_steps: int = 0, progress: bool = False,
             on_step: Callable[[int, Any], None] | None = None, image_size: int = 0,
             render_fast: bool = False) -> EvalResult:
    """Roll out ``episodes`` episodes with seeds seed, seed+1, ...; success = info['success'] at the end.

    ``on_step(episode, env)`` is called after each reset and each step (a video recorder).
    ``image_size`` > 0: an image policy, called as ``policy(obs, image)`` with the task camera's
    uint8 (S, S, 3) frame, rendered only when the policy is queried (once per chunk)."""
    from tqdm import tqdm

    from qc_robot.sim.tasks import make_env

    env = make_env(env_name, sparse_reward=sparse_reward, max_episode_steps=max_episode_steps,
                   image_size=image_size if image_size > 0 else -1, render_fast=render_fast)
    successes, returns, lengths, queries = [], [], [], 0
    for ep in tqdm(range(episodes), desc="eval", disable=not progress, leave=False):
        obs, _ = env.reset(seed=seed + ep)
        if on_step is not None:
            on_step(ep, env)
        queue: list[np.ndarray] = []
        ret, length, done = 0.0, 0, False
        info: dict = {}
        while not done:
            if not queue:
                queue = list(policy(obs, env.image()) if image_size > 0 else policy(obs))  # type: ignore[call-arg]
                queries += 1
            obs, reward, terminated, truncated, info = env.step(queue.pop(0))
            if on_step is not None:
                on_step(ep, env)
            ret += float(reward)
            length += 1
            done = terminated or truncated
        successes.append(float(bool(info.get("success", False))))
        returns.append(ret)
        lengths.append(length)
    env.close()
    return EvalResult(float(np.mean(successes)), float(np.mean(returns)), float(np.mean(lengths)),
                      episodes, queries)


def agent_policy(agent, seed: int = 0) -> ChunkFn:  # noqa: ANN001 (QCAgent; torch imported lazily)
    """Wrap a QCAgent as obs → chunk, with its own noise generator (training RNG untouched)."""
    import torch

    gen = torch.Generator(device=agent.device).manual_seed(seed)
    if agent.encoder is not None:  # (obs, frame) → chunk: the sim renders one camera

        def with_image(obs: np.ndarray, img: np.ndarray) -> np.ndarray:
            return agent.act(obs[None], generator=gen, images=[img[None]])[0]

        return with_image  # type: ignore[return-value]
    return lambda obs: agent.act(obs[None], generator=gen)[0]


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
    recorder = _recorder(cfg)
    result = evaluate(agent_policy(ckpt.agent, cfg.seed), name, cfg.episodes, cfg.seed, sparse, max_steps,
                      progress=cfg.progress, on_step=recorder, image_size=eval_image_size(ckpt.agent),
                      render_fast=cfg.env.render_fast)
    print(f"{name}: success {result.success_rate:.3f} over {result.episodes} episodes "
          f"(return {result.mean_return:.1f}, length {result.mean_length:.0f}, "
          f"{result.policy_queries} policy queries) at update {ckpt.step}")
    print(f"policy: {label}")
    if recorder is not None:
        path = recorder.close()
        print(f"video of the first {cfg.video_episodes} episode(s): {path}")
    return 0


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
