"""What one fine-tuning run trains and keeps: the agent, the replay and its sampler, the counters.

Built straight from the offline checkpoint (a fresh run) or from the run's own checkpoint (a
resume); the offline dataset is reloaded into the replay either way, the online rows come from
the checkpoint. Saved in the format ``qc-robot train`` writes, so ``export``, ``eval`` and
``serve`` take a fine-tuned checkpoint like any other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qc_robot.agent.agent import QCAgent
from qc_robot.config import TrainConfig
from qc_robot.data.replay import ChunkReplay
from qc_robot.finetune.config import FinetuneConfig
from qc_robot.train.checkpoint import Checkpoint, config_hash, load_checkpoint
from qc_robot.train.learner import CHECKPOINT, dataset_of, reward_convention_of


@dataclass
class Training:
    agent: QCAgent
    replay: ChunkReplay
    """The offline data (kept) and the online episodes after it (a ring of ``replay_capacity``)."""
    sampler: torch.Generator
    config: TrainConfig
    """The offline run's config with this run's dataset, run_dir and seed: what the checkpoint stores."""
    step: int
    """Gradient updates in all, the offline ones included (the checkpoint's ``step``)."""
    env_steps: int
    resumed: dict[str, Any] = field(default_factory=dict)
    """The run checkpoint's finetune state (``extra['finetune']``); empty for a fresh run."""
    is_resume: bool = False


def open_training(cfg: FinetuneConfig, offline: Checkpoint) -> Training:
    """The run's training state; ValueError when the dataset cannot go with the checkpoint."""
    tcfg = copy.deepcopy(offline.config)
    tcfg.training.run_dir, tcfg.training.seed = cfg.run_dir, cfg.seed
    if cfg.data_path:
        tcfg.data.path = cfg.data_path
    if offline.agent.image_shapes and tcfg.agent.vision.frame_stack > 1:
        raise ValueError("finetune of a frame-stacked image policy is not supported yet: the server "
                         "journals the stacked frames the policy took, the replay stacks stored frames")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_ckpt = Path(cfg.run_dir) / CHECKPOINT
    run = load_checkpoint(run_ckpt, device=cfg.device or None) if run_ckpt.exists() else None
    agent = (run or offline).agent

    data = dataset_of(tcfg) if Path(tcfg.data.path).exists() else None
    if data is not None:
        if reward_convention_of(tcfg, data) != offline.reward:
            raise ValueError(f"{tcfg.data.path} holds {reward_convention_of(tcfg, data)} rewards but {cfg.checkpoint} "
                             f"was trained on {offline.reward} rewards; fine-tune with the dataset it was trained on")
        widths = (data.observations.shape[1], data.actions.shape[1])
        if widths != (agent.obs_dim, agent.act_dim):
            raise ValueError(f"{tcfg.data.path}: observation/action widths {widths} but {cfg.checkpoint} takes "
                             f"{(agent.obs_dim, agent.act_dim)}; fine-tune with the dataset it was trained on")
    image_shapes = ({k: tuple(v.shape[1:]) for k, v in data.images.items()} if data is not None
                    else dict(agent.image_shapes))
    offline_rows = len(data.rewards) if data is not None else 0
    replay = ChunkReplay(agent.obs_dim, agent.act_dim, offline_rows + cfg.replay_capacity + 1, agent.device,
                         image_shapes=image_shapes)
    if data is not None:
        replay.add_offline(data.as_replay_dict())
    sampler = torch.Generator(device=agent.device).manual_seed(cfg.seed)
    if run is None:
        return Training(agent, replay, sampler, tcfg, offline.step, 0)
    sampler.set_state(run.extra["sampler"])
    replay.load_online_state(run.extra["online_rows"])
    replay.end_episode()  # the rows of a replay end whole episodes; this only guards older checkpoints
    return Training(agent, replay, sampler, tcfg, run.step, run.env_steps, run.extra.get("finetune", {}), True)


def checkpoint_of(tr: Training, offline: Checkpoint, step: int, env_steps: int,
                  finetune_state: dict[str, Any]) -> Checkpoint:
    """The run's checkpoint: the policy with the offline checkpoint's interface (fields, action
    bounds, control rate, reward convention), and what an exact resume needs."""
    return Checkpoint(
        agent=tr.agent, config=tr.config, step=step, env_steps=env_steps, obs_fields=offline.obs_fields,
        action_low=offline.action_low, action_high=offline.action_high, control_hz=offline.control_hz,
        config_hash=config_hash(tr.config), reward=offline.reward,
        extra={"sampler": tr.sampler.get_state(), "online_rows": tr.replay.online_state(),
               "finetune": finetune_state})


__all__ = ["Training", "checkpoint_of", "open_training"]
