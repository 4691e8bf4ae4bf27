"""Tiny acting policies with random weights for the export and runtime tests (fast on CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qc_robot.agent.acting import ActingPolicy
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor
from qc_robot.export.onnx_export import build_metadata, export_policy
from qc_robot.policies.base import ObsField
from qc_robot.policies.onnx_metadata import PolicyMetadata

OBS_FIELDS = [ObsField("joint_pos", (4,)), ObsField("target", (2,))]
OBS_DIM = 6
ACTION_DIM = 3
# asymmetric, offset limits so a wrong un-normalization cannot pass by accident
LOW = np.array([-1.0, 0.0, -0.05], np.float32)
HIGH = np.array([2.0, 0.5, 0.0], np.float32)
HIDDEN = [32, 32]  # wide enough for the scripted policies (D = H·A ≤ 32)
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


@torch.no_grad()
def _set_linear_mlp(mlp: torch.nn.Module, pick: torch.Tensor, out: torch.Tensor, shift: float = 10.0) -> None:
    """Make an MLP (Linear → GELU per hidden layer → Linear) compute ``out @ (pick @ input)``.

    Hidden units run at +``shift``, where exact GELU is the identity to float precision
    (Φ(10) = 1 − 7.6e-24), so the net is linear in its input yet exercises the real layers.
    """
    layers = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
    k = pick.shape[0]
    for i, lin in enumerate(layers[:-1]):
        lin.weight.zero_()
        lin.bias.fill_(shift)
        if i == 0:
            lin.weight[:k] = pick
        else:
            lin.weight[:k, :k] = torch.eye(k)
            lin.bias[:k] = 0.0  # the shift is carried through from the first layer
    last = layers[-1]
    last.weight.zero_()
    last.weight[:, :k] = out
    last.bias.copy_(-(out @ torch.full((k,), shift)))


SMOOTH_FLOW_STEPS = 10  # guidance needs fine enough Euler steps (the paper uses 5-10)


def make_smooth_acting(actor_type: str, chunk_len: int, seed: int = 0) -> ActingPolicy:
    """A scripted, multimodal acting policy: every sample is a *constant* chunk (the same action
    at each step, up to 3%) whose level is the noise's mean per action dimension, so two samples
    disagree by a jump while each is smooth. The flow's velocity is ``3·(P − I)·x`` (P averages
    over the chunk's steps): 10 Euler steps keep ``P·x_0`` and shrink the rest by 0.7^10; its
    denoised estimate ``x + (1 − t)·v`` is fair, as a trained flow's is. The one-step actor is
    ``P·z``. The critic keeps random weights (best-of-N ranks by it)."""
    acting = make_acting(Variant(actor_type, chunk_len), seed)
    acting.flow_steps = SMOOTH_FLOW_STEPS
    d = chunk_len * ACTION_DIM
    eye = torch.eye(ACTION_DIM)
    avg = torch.kron(torch.full((chunk_len, chunk_len), 1.0 / chunk_len), eye)  # (D, D): P
    if actor_type == "best_of_n":
        pick = torch.zeros(d, OBS_DIM + d + 1)
        pick[:, OBS_DIM : OBS_DIM + d] = torch.eye(d)
        _set_linear_mlp(acting.flow.mlp, pick, 3.0 * (avg - torch.eye(d)))
    else:
        assert acting.one_step_actor is not None
        pick = torch.zeros(d, OBS_DIM + d)
        pick[:, OBS_DIM:] = torch.eye(d)
        _set_linear_mlp(acting.one_step_actor.mlp, pick, avg)
    return acting.eval()
