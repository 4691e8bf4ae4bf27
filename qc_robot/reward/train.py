"""``qc-robot reward``: train a success detector on labelled episodes, measure it on held-out
episodes, export it (:mod:`qc_robot.reward.export`) and write its metrics JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import qc_robot
from qc_robot.agent.encoder import random_shift
from qc_robot.policies.success_detector import DetectorMetadata
from qc_robot.reward.config import RewardConfig
from qc_robot.reward.data import (
    NEGATIVE,
    POSITIVE,
    LabelledFrames,
    load_labelled,
    read_filter,
    split_episodes,
)
from qc_robot.reward.metrics import SWEEP, episode_metrics, frame_metrics, summary_line
from qc_robot.reward.model import DetectorNet


@dataclass
class TrainedDetector:
    net: DetectorNet
    frames: LabelledFrames
    train: np.ndarray
    """Training episode ids."""
    valid: np.ndarray
    """Held-out episode ids."""
    metrics: dict[str, Any]


def metrics_path(out: str | Path) -> Path:
    """Where the metrics JSON of detector ``out`` goes: beside it, ``reward.onnx`` → ``reward.metrics.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".metrics.json")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict(net: DetectorNet, frames: LabelledFrames, rows: np.ndarray, batch: int = 1024) -> np.ndarray:
    """P(success) of frames ``rows``: (len(rows),) float32."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    for lo in range(0, len(rows), batch):
        r = rows[lo:lo + batch]
        imgs = [torch.from_numpy(frames.images[k][r]).to(dev) for k in net.image_keys]
        out.append(net(torch.from_numpy(frames.state[r]).to(dev), *imgs).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def hard_negatives(frames: LabelledFrames, episodes: np.ndarray, last: int) -> np.ndarray:
    """Frame rows of the last ``last`` frames of each failure among ``episodes``."""
    out = [frames.rows(np.array([e]))[-last:] for e in episodes if not frames.success[e]] if last > 0 else []
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def fit(cfg: RewardConfig, frames: LabelledFrames, train: np.ndarray) -> tuple[DetectorNet, list[float]]:
    """Train the detector on the labelled frames of ``train`` episodes; returns it and the loss curve.

    Each batch is half positives and half negatives (positives are a few frames per success); of
    the negatives, ``hard_negative_share`` of the batch comes from the hard ones (the end of each
    failure: uniform sampling would all but never show the detector the near misses)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = _device(cfg.device)
    rows = frames.rows(train)
    pos, neg = rows[frames.labels[rows] == POSITIVE], rows[frames.labels[rows] == NEGATIVE]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"training needs positive and negative frames, got {len(pos)} and {len(neg)}")
    hard = hard_negatives(frames, train, cfg.hard_negative_frames)
    shapes = {f.key: (int(f.shape[0]), int(f.shape[1]), int(f.shape[2]))
              for f in frames.obs_fields if f.key in frames.images}
    net = DetectorNet(frames.state.shape[1], shapes, cfg.hidden_dims, cfg.channels, cfg.blocks, cfg.image_dim)
    net.set_stats(frames.state[rows])
    net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    half = max(cfg.batch_size // 2, 1)
    n_hard = min(half, int(round(cfg.batch_size * cfg.hard_negative_share))) if len(hard) else 0
    target = torch.cat([torch.ones(half), torch.zeros(half)]).to(dev)  # (B,)
    losses: list[float] = []
    from tqdm import tqdm

    for _ in tqdm(range(cfg.steps), desc="reward", disable=not cfg.progress, leave=False):
        idx = np.concatenate([rng.choice(pos, half), rng.choice(hard, n_hard) if n_hard else hard[:0],
                              rng.choice(neg, half - n_hard)])  # (B,)
        state = torch.from_numpy(frames.state[idx]).to(dev)  # (B, O)
        imgs = [random_shift(torch.from_numpy(frames.images[k][idx]).to(dev), cfg.aug_pad) for k in net.image_keys]
        loss = loss_fn(net.logits(state, imgs, cfg.obs_noise), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return net.eval(), losses


def evaluate(net: DetectorNet, frames: LabelledFrames, episodes: np.ndarray, threshold: float,
             debounce: int, sweep: tuple[float, ...] = ()) -> dict[str, Any]:
    """Per-frame and per-episode metrics of ``net`` on ``episodes`` (and per-episode recall and
    false-positive rate at each threshold of ``sweep``)."""
    rows = frames.rows(episodes)
    prob = np.full(len(frames), np.nan, np.float32)
    prob[rows] = predict(net, frames, rows)
    out: dict[str, Any] = {
        "frame": frame_metrics(prob[rows], frames.labels[rows], threshold),
        "episode": episode_metrics(prob, frames.episode, frames.labels, frames.success, episodes,
                                   threshold, debounce)}
    if sweep:
        out["episode_sweep"] = [
            {"threshold": t, **{k: v for k, v in episode_metrics(prob, frames.episode, frames.labels, frames.success,
                                                                episodes, t, debounce).items()
                                if k in ("precision", "recall", "fpr", "fp", "tp")}}
            for t in sweep]
    return out


def train_detector(cfg: RewardConfig) -> TrainedDetector:
    """Load, split, train and measure; nothing is written."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    frames = load_labelled(cfg.paths, cfg.obs_keys, cfg.positive_frames, cfg.gap_frames)
    names = read_filter(cfg.paths, cfg.valid_filter) if cfg.valid_filter else None
    train, valid = split_episodes(frames, cfg.valid_fraction, cfg.seed, names)
    net, losses = fit(cfg, frames, train)
    held = evaluate(net, frames, valid, cfg.threshold, cfg.debounce, SWEEP)
    seen = evaluate(net, frames, train, cfg.threshold, cfg.debounce)
    metrics: dict[str, Any] = {
        "task": frames.task,
        "data": [str(p) for p in cfg.paths],
        "obs_keys": [f.key for f in frames.obs_fields],
        "threshold": cfg.threshold, "debounce": cfg.debounce,
        "positive_frames": cfg.positive_frames, "gap_frames": cfg.gap_frames,
        "split": {"train_episodes": int(len(train)), "valid_episodes": int(len(valid)),
                  "train_successes": int(frames.success[train].sum()),
                  "valid_successes": int(frames.success[valid].sum()),
                  "valid_names": [frames.names[i] for i in valid], "skipped_unlabelled": len(frames.skipped)},
        "valid": held,
        "train": seen,
        "steps": cfg.steps,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
    }
    return TrainedDetector(net.cpu(), frames, train, valid, metrics)


def build_metadata(cfg: RewardConfig, result: TrainedDetector) -> DetectorMetadata:
    """The file's metadata: spec, decision rule, task, metrics, the training config."""
    return DetectorMetadata(
        obs_fields=list(result.frames.obs_fields), threshold=cfg.threshold, debounce=cfg.debounce,
        task=result.frames.task, control_hz=result.frames.control_hz, positive_frames=cfg.positive_frames,
        gap_frames=cfg.gap_frames, metrics=result.metrics, config=dataclasses.asdict(cfg),
        code_version=qc_robot.__version__, torch_version=torch.__version__)


def train_and_export(cfg: RewardConfig) -> tuple[TrainedDetector, Path]:
    """Train, measure on held-out episodes, export (verified) and write the metrics JSON;
    returns the trained detector and the file written."""
    from qc_robot.cli_errors import UserError
    from qc_robot.reward.export import export_detector

    if not cfg.paths:
        raise UserError("no episode files: give them as qc-robot reward FILE.hdf5 ... (or paths=[a.hdf5,b.hdf5])")
    for p in cfg.paths:
        if not Path(p).is_file():
            raise UserError(f"paths: {p} not found (give HDF5 episode files written by qc-robot teleop)")
    result = train_detector(cfg)
    meta = build_metadata(cfg, result)
    held = result.frames.rows(result.valid)
    images = {k: v[held] for k, v in result.frames.images.items()}
    path, err = export_detector(result.net, meta, cfg.out, result.frames.state[held], images,
                                opset=cfg.opset, parity_tol=cfg.parity_tol, seed=cfg.seed)
    result.metrics["export"] = {"path": str(path), "parity_max_abs": err, "parity_tol": cfg.parity_tol}
    metrics_path(path).write_text(json.dumps(result.metrics, indent=2) + "\n")
    return result, path


def run_reward(cfg: RewardConfig) -> int:
    """CLI ``qc-robot reward``: train, measure on held-out episodes, export, write the metrics JSON
    (with ``check=``: measure an exported detector instead, :mod:`qc_robot.reward.check`)."""
    if cfg.check:
        return _run_check(cfg)
    result, path = train_and_export(cfg)
    m, s = result.metrics, result.metrics["split"]
    print(f"success detector for {m['task'] or 'the task'} on {m['obs_keys']}: {s['train_episodes']} training, "
          f"{s['valid_episodes']} held-out episodes ({s['valid_successes']} successes); threshold "
          f"{cfg.threshold:g}, debounce {cfg.debounce}")
    print("held-out " + summary_line("frames", m["valid"]["frame"]))
    print("held-out " + summary_line("episodes", m["valid"]["episode"])
          + f", early fires {m['valid']['episode']['early_fires']}")
    print("held-out episodes by threshold (debounce fixed): " + ", ".join(
        f"{r['threshold']:g}: recall {_fmt(r['recall'])} fpr {_fmt(r['fpr'])}" for r in m["valid"]["episode_sweep"]))
    print(f"exported to {path} (onnxruntime matches torch within {m['export']['parity_max_abs']:.2g}); "
          f"metrics in {metrics_path(path)}")
    return 0


def _run_check(cfg: RewardConfig) -> int:
    from qc_robot.cli_errors import UserError
    from qc_robot.reward.check import run_check

    for p in [cfg.check, *cfg.paths]:
        if not Path(p).is_file():
            raise UserError(f"{p} not found (check=DETECTOR.onnx, then HDF5 episode files with verdicts)")
    if not cfg.paths:
        raise UserError("check: no episode files to measure it on (qc-robot reward FILE.hdf5 ... check=reward.onnx)")
    return run_check(cfg.check, list(cfg.paths), cfg.report)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
