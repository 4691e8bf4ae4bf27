"""Configuration of ``qc-robot reward`` (the schema of configs/reward.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class RewardConfig:
    """Train a success detector on labelled episodes (the label each teleop/drive episode carries:
    'success' or 'failure'), report precision, recall and false-positive rate per frame and per
    episode on held-out episodes, and export it to a self-describing ONNX file for
    ``drive reward_model=...``. Labels per frame: the last ``positive_frames`` frames of a success
    are positives; every frame of a failure and the frames of a success before
    ``positive_frames + gap_frames`` from its end are negatives (the gap is neither)."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("paths",)
    paths: list[str] = field(default_factory=list)
    """Required: HDF5 episode files (robomimic layout, as ``qc-robot teleop`` writes them) with a
    'label' (or 'success') attribute on each demo; unlabelled demos are skipped with a note."""
    out: str = "reward.onnx"
    """The ONNX file to write (put it beside the policy); the metrics go to <out stem>.metrics.json."""
    obs_keys: list[str] | None = None
    """Observation keys the detector reads (None: every vector key; images are left out with a
    note). uint8 (H, W, C) keys are camera images, encoded by the agent's IMPALA encoder."""
    positive_frames: int = 5
    """Positives: the last this many frames of each success episode (a frame is an observation:
    the first obs and each step's next_obs, so the final success state is one)."""
    gap_frames: int = 5
    """Frames just before the positives of a success, left out of training and of the per-frame
    metrics: the approach to success, whose label is uncertain."""
    threshold: float = 0.5
    """A frame is above threshold when P(success) >= this (stored in the file; ``drive`` may
    override it)."""
    debounce: int = 3
    """The detector fires after this many consecutive frames above threshold (stored in the file)."""
    valid_fraction: float = 0.25
    """Held-out share of the episodes, drawn per label (successes and failures alike)."""
    valid_filter: str = ""
    """Instead of a random split: hold out the demos listed in this file mask (e.g. 'valid',
    written by ``qc-robot dataset split``); all others train."""
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    """MLP widths after the (normalized state, image features) input."""
    steps: int = 2000
    """Gradient steps (Adam)."""
    batch_size: int = 256
    """Frames per step, half positives and half negatives (the classes are balanced by sampling)."""
    hard_negative_frames: int = 10
    """The last this many frames of each failure episode are hard negatives: where a failure ended
    (a near miss, or a detector fire the operator overruled), the states most like a success."""
    hard_negative_share: float = 0.25
    """Share of each batch drawn from the hard negatives (0: negatives uniformly)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    obs_noise: float = 0.05
    """Training only: Gaussian noise added to the normalized state (in units of its std), so the
    detector does not key on exact values of a few recorded episodes."""
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    """Image encoder: channels of the IMPALA residual stacks (images only)."""
    blocks: int = 1
    """Image encoder: residual blocks per stack."""
    image_dim: int = 64
    """Image encoder: feature width per camera."""
    aug_pad: int = 4
    """Image encoder: random-shift augmentation in pixels during training (0: off)."""
    seed: int = 0
    """Seed of the split, the initialization and the sampler."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'auto' for training (images train much faster on a GPU); export runs on CPU."""
    opset: int = 18
    """ONNX opset of the exported graph."""
    parity_tol: float = 1e-5
    """Largest |ONNX − torch| probability difference the export check accepts."""
    progress: bool = True
    """Show a progress bar."""
    check: str = ""
    """Train nothing: measure this exported detector on ``paths`` (each episode held out: record
    them apart from its training files), at its threshold and debounce and over a sweep, with a
    95% upper bound on the per-episode false-positive rate."""
    report: str = ""
    """With ``check``: also write the measured rates as JSON to this path."""
