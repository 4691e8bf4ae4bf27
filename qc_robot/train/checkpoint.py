"""Self-describing checkpoints: config, normalizer (inside the agent), task spec, step, versions,
reward convention.

A checkpoint holds everything needed to resume training exactly (agent, optimizer, RNG states,
online replay rows) and to export or evaluate the policy without the training config files.
Writes are atomic (temp file + rename), so a crash mid-save never leaves a torn checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qc_robot
from qc_robot.agent.agent import QCAgent
from qc_robot.config import TrainConfig, VisionConfig, to_dataclass
from qc_robot.data.rewards import config_convention
from qc_robot.policies.base import ObsField

FORMAT = "qc-robot-checkpoint"
FORMAT_VERSION = 1


def config_hash(cfg: TrainConfig) -> str:
    """Short hash of what defines the learned function (agent, task, data), not of run paths."""
    payload = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("agent", "env", "data")}
    if payload["agent"].get("vision") == dataclasses.asdict(VisionConfig()):
        del payload["agent"]["vision"]  # image settings left at their defaults: hashes as before they existed
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    agent: QCAgent
    config: TrainConfig
    step: int
    """Gradient updates done (offline + online)."""
    obs_fields: list[ObsField]
    action_low: np.ndarray
    action_high: np.ndarray
    control_hz: float
    config_hash: str
    env_steps: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Learner state for exact resume: sampler RNG, online replay rows, loop counters."""
    reward: str = ""
    """The reward convention it was trained on ('sparse' or 'dense': ``qc_robot.data.rewards``);
    a checkpoint saved before it was stored gets its config's on load."""


def versions() -> dict[str, str]:
    return {"qc_robot": qc_robot.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(ckpt.config),
        "config_hash": ckpt.config_hash,
        "agent": ckpt.agent.state_dict(),
        "agent_dims": {"obs_dim": ckpt.agent.obs_dim, "act_dim": ckpt.agent.act_dim,
                       **({"image_shapes": {k: list(v) for k, v in ckpt.agent.image_shapes.items()}}
                          if ckpt.agent.image_shapes else {})},
        "step": ckpt.step,
        "env_steps": ckpt.env_steps,
        "obs_fields": [dataclasses.asdict(f) for f in ckpt.obs_fields],
        "action_low": np.asarray(ckpt.action_low, np.float32).tolist(),
        "action_high": np.asarray(ckpt.action_high, np.float32).tolist(),
        "control_hz": ckpt.control_hz,
        "versions": versions(),
        "extra": ckpt.extra,
        "reward": ckpt.reward or config_convention(ckpt.config),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: str | None = None) -> Checkpoint:
    """Load a checkpoint; ``device`` overrides the agent's configured device."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qc-robot checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {payload.get('format_version')} "
                         f"is not supported (expected {FORMAT_VERSION})")
    cfg = to_dataclass(TrainConfig, payload["config"])
    if device is not None:
        cfg.agent.device = device
    dims = payload["agent_dims"]
    agent = QCAgent(cfg.agent, dims["obs_dim"], dims["act_dim"], image_shapes=dims.get("image_shapes"))
    agent.load_state_dict(payload["agent"])
    return Checkpoint(
        agent=agent,
        config=cfg,
        step=int(payload["step"]),
        env_steps=int(payload.get("env_steps", 0)),
        obs_fields=[ObsField(f["key"], tuple(f["shape"]), f["dtype"]) for f in payload["obs_fields"]],
        action_low=np.asarray(payload["action_low"], np.float32),
        action_high=np.asarray(payload["action_high"], np.float32),
        control_hz=float(payload["control_hz"]),
        config_hash=str(payload["config_hash"]),
        versions=dict(payload.get("versions", {})),
        extra=dict(payload.get("extra", {})),
        reward=str(payload.get("reward") or config_convention(cfg)),
    )
