"""Typed configuration: the structured-config schema behind the Hydra YAML in ``configs/``.

The CLI composes YAML with these dataclasses as schema (so a typo in an override is an error),
then converts the result to plain dataclasses with :func:`to_dataclass`. Nothing below the CLI
sees a ``DictConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class AgentConfig:
    """The Q-chunking agent (QC_SPEC defaults)."""

    actor_type: str = "best_of_n"
    """'best_of_n' (QC: N flow samples ranked by Q) or 'fql' (QC-FQL: one-step distilled actor)."""
    horizon: int = 5
    """Chunk length h: actions per policy query and steps per critic backup."""
    action_chunking: bool = True
    """False with horizon > 1 gives the n-step-return baselines (critic/actor on the first action)."""
    hidden_dims: list[int] = field(default_factory=lambda: [512, 512, 512, 512])
    """MLP widths for critic, flow actor and one-step actor."""
    num_qs: int = 2
    """Critic ensemble size."""
    q_agg: str = "mean"
    """Aggregation over the ensemble for targets and sample ranking: 'mean' or 'min'."""
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critic."""
    flow_steps: int = 10
    """Euler steps of the flow sampler."""
    num_samples: int = 32
    """N for best-of-N sampling."""
    alpha: float = 100.0
    """QC-FQL distillation weight."""
    fourier_time_dims: int = 0
    """0: time enters the flow net as a scalar; >0: that many Fourier features."""
    compile: bool = False
    """torch.compile the update (pays off on GPU and for long CPU runs)."""
    sample_dtype: str = "auto"
    """dtype of the no-grad sampling inside an update (best-of-N / distillation targets):
    'float32', 'bfloat16' (bf16 weight copies; Euler state, normalization and the target
    critic stay fp32) or 'auto' (bf16 where the hardware has it natively). Acting is fp32."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""


@dataclass
class EnvConfig:
    """A simulated task."""

    name: str = "cube-single-task1"
    """Short task name ('' in ``eval``: the checkpoint's task); understood by ``sim.tasks`` (e.g. cube-double-task2, scene-task2)."""
    sparse_reward: bool | None = None
    """r = -1 unless the env reward is 0; None: the task's default (sparse for scene and puzzle,
    as in the paper)."""
    max_episode_steps: int = 0
    """0: the task's own limit."""


@dataclass
class DataConfig:
    """Offline data: an HDF5 file in our robomimic layout, generated or logged."""

    path: str = "data/${env.name}.hdf5"
    num_episodes: int = 100
    """Episodes for ``qc-robot datagen``."""
    episode_length: int = 1000
    """Steps per generated play episode."""
    noise: float = 0.1
    """Std of the oracle's action noise in datagen."""
    seed: int = 0
    task_goal_prob: float = 0.0
    """datagen, cube tasks: fraction of the oracle's new targets set to the evaluation task's
    goals (0 = OGBench's plain play data)."""
    reward_shift: float = 0.0
    """Added to every logged reward when loading (robomimic uses -1)."""


@dataclass
class TrainingConfig:
    """One learner loop: offline updates, then online env steps (either may be 0)."""

    offline_steps: int = 1_000_000
    online_steps: int = 0
    utd: int = 1
    """Updates per online env step."""
    start_online_updates: int = 0
    """Online env steps collected before online updates begin."""
    eval_interval: int = 100_000
    eval_episodes: int = 50
    log_interval: int = 5_000
    save_interval: int = 0
    """0: save only at the end (and at each eval)."""
    seed: int = 0
    run_dir: str = "runs/${env.name}-${agent.actor_type}-s${training.seed}"
    resume: bool = False
    """Resume from ``run_dir``'s last checkpoint if it exists."""
    progress: bool = True
    threads: int = 0
    """torch CPU threads (0: torch's default, all cores)."""


@dataclass
class TrainConfig:
    agent: AgentConfig = field(default_factory=AgentConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class DatagenConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True


@dataclass
class EvalConfig:
    checkpoint: str = "???"
    env: EnvConfig = field(default_factory=EnvConfig)
    episodes: int = 50
    seed: int = 1000
    progress: bool = True


@dataclass
class ExportConfig:
    checkpoint: str = "???"
    out: str = "model.onnx"
    control_hz: float = 0.0
    """0: the task's control rate from the checkpoint."""
    opset: int = 18
    parity_tol: float = 1e-4
    verify: bool = True


def to_dataclass(cls: type[T], cfg: Any) -> T:
    """Build dataclass ``cls`` from a DictConfig/dict, recursively, with interpolations resolved."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return _build(cls, cfg)


def _build(cls: Any, data: Any) -> Any:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return data
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in (data or {}).items():
        if name not in hints:
            raise ValueError(f"unknown config key {cls.__name__}.{name}")
        ftype = hints[name].type
        sub = _resolve_type(cls, ftype)
        kwargs[name] = _build(sub, value) if sub is not None else value
    return cls(**kwargs)


def _resolve_type(owner: Any, ftype: Any) -> Any:
    if isinstance(ftype, str):
        ftype = globals().get(ftype) or vars(__import__(owner.__module__, fromlist=["x"])).get(ftype)
    return ftype if dataclasses.is_dataclass(ftype) else None
