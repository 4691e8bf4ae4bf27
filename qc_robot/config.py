"""Typed configuration: the structured-config schema behind the Hydra YAML in ``configs/``.

The CLI composes YAML with these dataclasses as schema (so a typo in an override is an error),
then converts the result to plain dataclasses with :func:`to_dataclass`. Nothing below the CLI
sees a ``DictConfig``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class VisionConfig:
    """Image observations (used only when the data has image keys, ``data.obs_keys``)."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    """Channels of the IMPALA-style residual stacks (each halves H and W); the reference's
    impala_small is [16, 32, 32]."""
    blocks: int = 1
    """Residual blocks per stack (impala_small: 1)."""
    out_dim: int = 256
    """Width of each camera's feature (linear + GELU after the conv stacks; the reference: 512)."""
    layer_norm: bool = False
    """LayerNorm on each camera's feature."""
    encoder_grad: str = "critic"
    """Which losses train the shared encoder: 'critic' (DrQ: the actors see detached
    features) or 'all' (critic, BC flow and distillation; never QC-FQL's Q loss)."""
    aug_pad: int = 4
    """Random-shift augmentation: each image moved by up to this many pixels (edges
    replicated), independently for s and s'; 0 turns it off. Training only."""
    frame_stack: int = 1
    """Frames per image observation, stacked along channels (the current one last; at an
    episode's start the first frame repeats). 1: no stacking."""


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
    """LayerNorm after each hidden layer of the critic."""
    actor_layer_norm: bool = False
    """LayerNorm after each hidden layer of the flow and one-step actors."""
    lr: float = 3e-4
    """Adam learning rate of every network."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: plain Adam)."""
    batch_size: int = 256
    """Chunks per gradient update."""
    discount: float = 0.99
    """Per-step discount γ (the chunk backup bootstraps with γ^h)."""
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
    """dtype of the flow's no-grad Euler passes inside an update (best-of-N candidates and the
    distillation target): 'float32', 'bfloat16' (a bf16 copy of the flow's weights; Euler state
    and normalization stay fp32) or 'auto' (bf16 where the hardware has it natively). The
    critic that ranks best-of-N candidates, the target critic and acting are always fp32."""
    fast_sampling: bool = True
    """Run the update's no-grad sampling on fused weight copies (one oneDNN GEMM+bias+GELU call
    per layer on CPU; the same arithmetic). False: through the nn.Module forward (the baseline
    of benchmarks/bench_update.py). With compile=True only the loss is compiled."""
    obs_norm: str = "none"
    """Observation normalization: 'none' (raw observations, as the reference) or 'std'
    ((obs - mean) / max(std, obs_norm_eps) with the offline data's statistics)."""
    obs_norm_eps: float = 1e-3
    """Floor on the std for obs_norm='std'."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image encoder, its augmentation and frame stacking (images only)."""


@dataclass
class EnvConfig:
    """A simulated task."""

    name: str = "cube-single-task1"
    """Short task name ('' in ``eval``: the checkpoint's task); understood by ``qc_robot.sim.tasks`` (e.g. cube-double-task2, scene-task2)."""
    sparse_reward: bool | None = None
    """r = -1 unless the env reward is 0; None: the task's default (sparse for scene and puzzle,
    as in the paper)."""
    max_episode_steps: int = 0
    """0: the task's own limit."""
    image_size: int = -1
    """Side of the square camera images the sim renders into the observation (-1: the task's
    default, OGBench's 64 on the visual-* tasks, none otherwise; 0: none). Rendering costs
    35-700 ms a frame on a CPU."""
    image_key: str = "image"
    """Observation key of the camera image (uint8 (image_size, image_size, 3) RGB)."""
    camera: str = "front_pixels"
    """MuJoCo camera the image is rendered from (OGBench's pixel camera; 'front' is the video one)."""
    render_fast: bool = False
    """Cheaper rendering (512² shadow map, no MSAA) instead of OGBench's exact settings."""


@dataclass
class DataConfig:
    """Offline data: an HDF5 file in our robomimic layout, generated or logged."""

    path: str = "data/${env.name}.hdf5"
    """The HDF5 dataset: written by ``datagen``, read by ``train``."""
    num_episodes: int = 100
    """Episodes for ``qc-robot datagen``."""
    episode_length: int = 1000
    """Steps per generated play episode."""
    noise: float = 0.1
    """Std of the oracle's action noise in datagen."""
    seed: int = 0
    """datagen's random seed."""
    task_goal_prob: float = 0.0
    """datagen, cube tasks: fraction of the oracle's new targets set to the evaluation task's
    goals (0 = OGBench's plain play data)."""
    per_episode_seed: bool = False
    """datagen: draw episode i from a seed derived from (seed, i) alone (env reset, oracle noise,
    targets) instead of from one stream across episodes (the default, which made the published
    datasets). Always on with ``workers`` > 1, so those files equal ``workers=1`` with it on."""
    reward_shift: float = 0.0
    """Added to every logged reward when loading (robomimic uses -1)."""
    obs_keys: list[str] | None = None
    """Observation keys to train on (None: every key whose steps are vectors; image keys are
    left out, with a note). Vector keys are concatenated in this order into the state; uint8
    (H, W, 3) keys are images, each encoded by the agent's conv encoder (agent.vision)."""
    filter_key: str | None = None
    """Train only on the demos listed in ``mask/<filter_key>`` (e.g. robomimic's 'train')."""


@dataclass
class TrainingConfig:
    """One learner loop: offline updates, then online env steps (either may be 0)."""

    offline_steps: int = 1_000_000
    """Gradient updates on the dataset before any env step."""
    online_steps: int = 0
    """Env steps in sim after the offline phase (each chunk runs open-loop in full)."""
    utd: int = 1
    """Updates per online env step."""
    start_online_updates: int = 5_000
    """Online env steps collected before online updates begin (the reference: 5,000)."""
    eval_interval: int = 100_000
    """Evaluate (and save) every this many updates (0: only at the end of each phase)."""
    eval_episodes: int = 50
    """Episodes per evaluation (a success rate over 20 is good to about ±0.1)."""
    log_interval: int = 5_000
    """Write a metrics.csv row (losses, Q, updates/s) every this many updates."""
    save_interval: int = 0
    """0: save only at the end (and at each eval)."""
    seed: int = 0
    """Seed of torch, the replay sampler and the env resets."""
    run_dir: str = "runs/${env.name}-${agent.actor_type}-s${training.seed}"
    """Where checkpoint.pt, metrics.csv, eval.csv and learning_curve.png go."""
    resume: bool = False
    """Resume from ``run_dir``'s last checkpoint if it exists."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 0
    """torch CPU threads (0: torch's default, all cores)."""


@dataclass
class TrainConfig:
    """``qc-robot train``: one learner loop (offline updates, then online env steps)."""

    agent: AgentConfig = field(default_factory=AgentConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class DatagenConfig:
    """``qc-robot datagen``: an offline play dataset from OGBench's scripted oracles."""

    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True
    """Show a progress bar."""
    workers: int = 1
    """Episodes made on this many Ray actors (1: in this process, Ray never imported; more needs
    ``pip install "qc-robot[cluster]"``), always with ``data.per_episode_seed``, and written here
    in episode order: the file equals ``workers=1 data.per_episode_seed=true``'s. A killed
    worker's episode is made again."""
    ray_address: str = ""
    """'' = a local Ray instance started in-process (when ``workers`` > 1); ``auto`` or
    ``ray://HOST:10001``: a running cluster, used even with workers=1 (its workers need qc-robot
    installed; the file is written by this process)."""


@dataclass
class EvalConfig:
    """``qc-robot eval``: success rate of a checkpoint in sim."""

    checkpoint: str = "???"
    """Required: a ``checkpoint.pt`` written by ``train`` (e.g. runs/<run>/checkpoint.pt)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    episodes: int = 50
    """Evaluation episodes."""
    seed: int = 1000
    """Episode i resets with seed + i."""
    progress: bool = True
    """Show a progress bar."""
    video: str = ""
    """Write the first ``video_episodes`` episodes as a video ('' = none; .gif, or .mp4 with the
    video extra). MuJoCo offscreen rendering costs 35-300 ms a frame on a CPU."""
    video_episodes: int = 1
    """Episodes recorded into ``video``."""
    video_every: int = 2
    """Keep one frame in this many control steps (2: 10 frames per second of robot time)."""
    out: str = ""
    """Per-episode results as CSV (episode, seed, success, return, length, policy_queries and a
    CRC of the final observation), in episode order ('' = none): the same file whatever ``workers`` is."""
    workers: int = 1
    """Episodes run on this many Ray actors (1: in this process, Ray never imported; more needs
    ``pip install "qc-robot[cluster]"``). On workers the policy's noise restarts per episode
    (``per_episode_noise``), so each outcome depends on its seed alone and the results equal
    ``workers=1 per_episode_noise=true``'s; a killed worker's episode is rerun."""
    per_episode_noise: bool = False
    """Restart the policy's sampling noise at each episode from (seed, episode) instead of drawing
    it as one stream across episodes (the default, which every published figure used). On
    workers it is always on."""
    ray_address: str = ""
    """'' = a local Ray instance started in-process (when ``workers`` > 1); ``auto`` or
    ``ray://HOST:10001``: a running cluster, used even with workers=1 (its workers need qc-robot
    installed and must read ``checkpoint`` at the same path)."""


@dataclass
class ExportConfig:
    """``qc-robot export``: a checkpoint as one self-describing ONNX file."""

    checkpoint: str = "???"
    """Required: a ``checkpoint.pt`` written by ``train``."""
    out: str = "model.onnx"
    """The ONNX file to write."""
    control_hz: float = 0.0
    """0: the task's control rate from the checkpoint."""
    opset: int = 18
    """ONNX opset of the exported graph."""
    parity_tol: float = 1e-4
    """Largest |ONNX − torch| action difference the verification accepts."""
    verify: bool = True
    """Run the exported file in onnxruntime against torch on the same noise before keeping it."""


MISSING = "???"
"""OmegaConf's marker of a required value: a key whose default is this must be given."""


class MissingKeysError(ValueError):
    """Required config keys (``???`` in the schema or YAML) were not given."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(f"missing required key{'s' if len(keys) > 1 else ''} "
                         + ", ".join(f"{k}=..." for k in keys))


def to_dataclass(cls: type[T], cfg: Any, *, require: bool = True) -> T:
    """Build dataclass ``cls`` from a DictConfig/dict, recursively, with interpolations resolved.

    With ``require`` a required key left at ``???`` raises :class:`MissingKeysError` naming every
    such key, instead of passing the marker on as a value (``--help``/``--cfg`` pass False).
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            missing = sorted(OmegaConf.missing_keys(cfg))
            if require and missing:
                raise MissingKeysError(missing)
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover
        pass
    if require:
        missing = [k for k, v in _flatten(cfg) if v == MISSING]
        if missing:
            raise MissingKeysError(missing)
    return _build(cls, cfg)


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), data


@dataclass(frozen=True)
class KeyDoc:
    """One documented config key, as ``--help`` lists it."""

    key: str
    """Dotted path, e.g. ``agent.horizon``."""
    type: str
    doc: str
    """The field's docstring ('' when it has none)."""


def config_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of dataclass ``cls`` (nested dataclasses flattened to dotted paths), with
    the docstring written under each field (the CleanRL convention this project follows)."""
    out: list[KeyDoc] = []
    docs = field_docs(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be evaluated here: fall back to its text
        hints = {}
    for f in dataclasses.fields(cls):
        ftype = hints.get(f.name, f.type)
        if isinstance(ftype, type) and dataclasses.is_dataclass(ftype):
            out += config_keys(ftype, f"{prefix}{f.name}.")
            continue
        name = ftype.__name__ if isinstance(ftype, type) else str(ftype).replace("typing.", "")
        out.append(KeyDoc(prefix + f.name, name, docs.get(f.name, "")))
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated field of ``cls``.

    Python keeps no attribute docstrings at run time, so they are read from the class source;
    a class whose source is not available (a frozen install) simply has none.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:] + [None], strict=True):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


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
