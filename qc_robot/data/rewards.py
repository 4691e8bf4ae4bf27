"""Reward conventions and transforms shared by the sim env wrapper, the dataset loader, the learner
and ``qc-robot finetune`` (numpy only).

A *convention* says what a reward number means. A checkpoint stores the one it was trained on,
and ``qc-robot finetune`` refuses online rows that declare another:

* :data:`SPARSE`: -1 per step; 0 on the step that succeeds, which also terminates the episode
  (OGBench's sparse tasks as QC trains them, and what operator verdicts give);
* :data:`DENSE`: the sim task's shaped reward (cube tasks: solved subtasks - subtasks).

A file's *reward source* (``env_args['reward_source']``) says where its ``rewards`` array came
from: :data:`FROM_RECORDED`, what the env or driver reported at each step (a simulator's reward),
or :data:`FROM_VERDICT`, the operator's verdict on each episode (a real arm reports no reward;
the loader derives the rewards from each demo's ``label``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from qc_robot.config import TrainConfig

SPARSE = "sparse"
"""-1 per step, 0 and termination on the success step."""
DENSE = "dense"
"""The sim task's shaped reward."""
CONVENTIONS = (SPARSE, DENSE)

REWARD_SOURCE_KEY = "reward_source"
"""The ``env_args`` key naming a file's reward source."""
FROM_RECORDED = "recorded"
"""The rewards array holds what the env or driver reported (a simulator's reward)."""
FROM_VERDICT = "verdict"
"""The rewards come from each episode's verdict (demo attr ``label``), in the sparse convention."""
REWARD_SOURCES = (FROM_RECORDED, FROM_VERDICT)
VERDICTS = ("success", "failure")
"""The labels that are verdicts; anything else ('unlabelled': recovered after a crash) is none."""


def sparsify(rewards: np.ndarray | float) -> np.ndarray:
    """The paper's sparse reward for scene and puzzle: 0 where the task reward is 0 (success),
    else -1."""
    r = np.asarray(rewards, dtype=np.float32)
    return np.where(r == 0.0, 0.0, -1.0).astype(np.float32)


def reward_source(env_args: Mapping[str, Any]) -> str:
    """Where a file's rewards come from: its ``reward_source``, else inferred for files written
    before that key existed: a recording of a robot driver (``driver`` other than 'sim', no
    simulator ``task``) holds the driver's reward 0, so its rewards are the verdicts. Everything
    else (sim teleop, datagen, served-episode logs, robomimic files) holds recorded rewards.
    Raises ValueError for an unknown declared source."""
    declared = env_args.get(REWARD_SOURCE_KEY)
    if declared is not None:
        if declared not in REWARD_SOURCES:
            raise ValueError(f"env_args[{REWARD_SOURCE_KEY!r}] is {declared!r}, expected one of {REWARD_SOURCES}")
        return str(declared)
    if env_args.get("driver") not in (None, "sim") and "task" not in env_args:
        return FROM_VERDICT
    return FROM_RECORDED


def with_reward_source(env_args: Mapping[str, Any]) -> dict[str, Any]:
    """``env_args`` with its reward source stated (inferred when absent): two env_args that differ
    only in an inferred ``reward_source`` describe the same data."""
    return {**env_args, REWARD_SOURCE_KEY: reward_source(env_args)}


def verdict_rewards(label: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rewards (n,), dones (n,))`` of an n-step episode judged ``label``, in the sparse
    convention: a success is -1 ... -1 then 0 with termination on its last step; a failure is -1
    everywhere and never terminates (its last step is a truncation). None: ``label`` is no verdict."""
    if label not in VERDICTS:
        return None
    rewards = np.full(n, -1.0, np.float32)
    dones = np.zeros(n, np.float32)
    if label == "success" and n:
        rewards[-1], dones[-1] = 0.0, 1.0
    return rewards, dones


def sparse_flag_convention(sparse: bool) -> str:
    """The convention of a sim task run with ``sparse_reward=sparse``."""
    return SPARSE if sparse else DENSE


def config_convention(cfg: TrainConfig) -> str:
    """The convention a training config asks for: ``env.sparse_reward``, else the task's default
    (sparse for scene and puzzle, dense for cube). Training on verdict data makes it sparse
    whatever the config says (``qc_robot.train.learner``)."""
    sparse = cfg.env.sparse_reward
    if sparse is None:
        from qc_robot.sim.tasks import task_spec

        sparse = task_spec(cfg.env.name).sparse_default
    return sparse_flag_convention(bool(sparse))
