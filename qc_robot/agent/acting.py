"""The acting rule: Euler flow sampling, best-of-N ranking by Q, and the one-step actor.

These functions are used by the learner (for bootstrap targets and for acting) and by the ONNX
export, so training, in-process evaluation and the served policy compute the same thing.
Noise is an explicit argument: callers draw it, tests and export can fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qc_robot.agent.encoder import ObsEncoder
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor, aggregate_q


def euler_sample(flow: FlowActor, obs: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v(s, x, t) from x_0 = noise over t ∈ [0, 1]; returns clipped x_1 (B, D)."""
    obs_n = flow.normalizer(obs)  # normalize once, not once per step
    x = noise
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0], 1), i * dt, dtype=x.dtype, device=x.device)
        x = x + dt * flow.velocity(obs_n, x, t)
    return x.clamp(-1.0, 1.0)


def best_of_n(
    flow: FlowActor, critic: ChunkCritic, obs: torch.Tensor, noise: torch.Tensor, steps: int, q_agg: str
) -> torch.Tensor:
    """QC's acting rule: N flow samples per state, keep the one the critic ranks highest.

    obs (B, O), noise (B, N, D) → chunk (B, D). All B·N samples go through the networks as one
    batch; no Python loop over samples.
    """
    b, n, d = noise.shape
    obs_rep = obs.unsqueeze(1).expand(b, n, obs.shape[-1]).reshape(b * n, -1)  # (B·N, O)
    samples = euler_sample(flow, obs_rep, noise.reshape(b * n, d), steps)  # (B·N, D)
    q = aggregate_q(critic(obs_rep, samples), q_agg).reshape(b, n)  # (B, N)
    best = q.argmax(dim=1)  # (B,)
    return samples.reshape(b, n, d)[torch.arange(b, device=obs.device), best]  # (B, D)


def one_step(actor: OneStepActor, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """QC-FQL's acting rule: μ(s, z), clipped to [-1, 1]; noise (B, D)."""
    return actor(obs, noise).clamp(-1.0, 1.0)


class ActingPolicy(nn.Module):
    """The whole acting rule as one module: raw observation + noise → chunk in agent space.

    ``noise`` is (B, N, D) for best-of-N and (B, D) for the one-step actor, with D = H·A where H
    is the policy's chunk length. Output (B, H, A) in [-1, 1].

    An image policy holds its ``encoder``: ``forward(obs, noise, images)`` encodes (state,
    images) once into the features the networks take (:meth:`features`); everything after
    that is the state-only rule on features. Without an encoder the state is the features.
    """

    def __init__(
        self,
        actor_type: str,
        flow: FlowActor,
        critic: ChunkCritic | None,
        one_step_actor: OneStepActor | None,
        chunk_len: int,
        action_dim: int,
        flow_steps: int,
        q_agg: str,
        encoder: ObsEncoder | None = None,
    ) -> None:
        super().__init__()
        self.actor_type, self.chunk_len, self.action_dim = actor_type, chunk_len, action_dim
        self.flow_steps, self.q_agg = flow_steps, q_agg
        self.flow, self.critic, self.one_step_actor = flow, critic, one_step_actor
        self.encoder = encoder  # None registers nothing: a state-only state_dict is unchanged

    @property
    def image_keys(self) -> list[str]:
        return [] if self.encoder is None else list(self.encoder.image_keys)

    def features(self, obs: torch.Tensor, images: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """What the networks take: the state (no encoder) or the encoder's (B, F) features."""
        if self.encoder is None:
            return obs
        if images is None:
            raise ValueError(f"this policy needs images for {self.image_keys}")
        return self.encoder(obs, images)

    def forward(
        self, obs: torch.Tensor, noise: torch.Tensor, images: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        obs = self.features(obs, images)
        if self.actor_type == "best_of_n":
            assert self.critic is not None
            flat = best_of_n(self.flow, self.critic, obs, noise, self.flow_steps, self.q_agg)
        elif self.actor_type == "fql":
            assert self.one_step_actor is not None
            flat = one_step(self.one_step_actor, obs, noise)
        else:
            raise ValueError(f"unknown actor_type {self.actor_type!r}")
        return flat.reshape(obs.shape[0], self.chunk_len, self.action_dim)  # (B, H, A)
