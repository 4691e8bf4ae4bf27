"""Tiny acting policies with random weights for the export and runtime tests (fast on CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policies.base import ObsField
from policies.onnx_metadata import PolicyMetadata
from qc_robot.agent.acting import ActingPolicy
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor
from qc_robot.export.onnx_export import build_metadata, export_policy

OBS_FIELDS = [ObsField("joint_pos", (4,)), ObsField("target", (2,))]
OBS_DIM = 6
ACTION_DIM = 3
# asymmetric, offset limits so a wrong un-normalization cannot pass by accident
LOW = np.array([-1.0, 0.0, -0.05], np.float32)
HIGH = np.array([2.0, 0.5, 0.0], np.float32)
HIDDEN = [32, 32]
NUM_SAMPLES = 4
FLOW_STEPS = 3


@dataclass(frozen=True)
class Variant:
    actor_type: str
    chunk_len: int
    q_agg: str = "mean"
    time_dims: int = 0


def make_acting(v: Variant, seed: int = 0) -> ActingPolicy:
    """Random-weight ActingPolicy with non-trivial normalizer statistics."""
    torch.manual_seed(seed)
    d = v.chunk_len * ACTION_DIM
    flow = FlowActor(OBS_DIM, d, HIDDEN, time_dims=v.time_dims)
    critic = ChunkCritic(OBS_DIM, d, HIDDEN) if v.actor_type == "best_of_n" else None
    one_step = OneStepActor(OBS_DIM, d, HIDDEN) if v.actor_type == "fql" else None
    mean, std = torch.linspace(-1.0, 1.0, OBS_DIM), torch.linspace(0.5, 2.0, OBS_DIM)
    for net in (flow, critic, one_step):
        if net is not None:
            net.normalizer.set_stats(mean, std)
    return ActingPolicy(
        v.actor_type, flow, critic, one_step, v.chunk_len, ACTION_DIM, FLOW_STEPS, v.q_agg
    ).eval()


def make_meta(acting: ActingPolicy) -> PolicyMetadata:
    return build_metadata(
        acting, OBS_FIELDS, LOW, HIGH, 20.0, NUM_SAMPLES, train_step=123, config_hash="abc123"
    )


def export(v: Variant, path: Path, **kw: object) -> tuple[ActingPolicy, PolicyMetadata, Path]:
    acting = make_acting(v)
    meta = make_meta(acting)
    return acting, meta, export_policy(acting, meta, path, **kw)  # type: ignore[arg-type]


def torch_reference(acting: ActingPolicy, obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The acting rule in torch, un-normalized to robot units and clipped: (B, H, A)."""
    with torch.no_grad():
        x = acting(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()
    return np.clip(LOW + (x + 1.0) / 2.0 * (HIGH - LOW), LOW, HIGH)


def noise_shape(v: Variant) -> tuple[int, ...]:
    d = v.chunk_len * ACTION_DIM
    return (NUM_SAMPLES, d) if v.actor_type == "best_of_n" else (d,)
