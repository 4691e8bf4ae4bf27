"""Networks of the QC agent: chunk critic ensemble, flow-matching actor, one-step actor.

Every network takes *raw* observations and normalizes them itself (the normalizer is a buffer
of the module), so a checkpoint or an exported graph carries its own statistics. Actions live in
the agent's space [-1, 1]; mapping to robot units happens at export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ObsNormalizer(nn.Module):
    """(obs - mean) / std with statistics fixed from the offline data."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, obs_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-3) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.clamp(torch.as_tensor(std, dtype=torch.float32), min=eps))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


def _init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """Linear → GELU (→ LayerNorm) for each hidden width, then a linear output."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, layer_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for w in hidden:
            layers += [_init_linear(nn.Linear(d, w)), nn.GELU()]
            if layer_norm:
                layers.append(nn.LayerNorm(w))
            d = w
        layers.append(_init_linear(nn.Linear(d, out_dim)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matmul: (E, B, i) → (E, B, o)."""

    def __init__(self, ensemble: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, out_dim))
        bound = math.sqrt(6.0 / (in_dim + out_dim))  # xavier uniform per member
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight) if x.dim() == 3 else x @ self.weight + self.bias


class EnsembleLayerNorm(nn.Module):
    """LayerNorm with separate affine parameters per ensemble member."""

    def __init__(self, ensemble: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ensemble, 1, dim))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (self.dim,)) * self.weight + self.bias


class ChunkCritic(nn.Module):
    """Ensemble Q_k(s, a_{t:t+h}) over the flattened chunk; returns (E, B)."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: Sequence[int], num_qs: int = 2, layer_norm: bool = True
    ) -> None:
        super().__init__()
        self.normalizer = ObsNormalizer(obs_dim)
        self.num_qs = num_qs
        layers: list[nn.Module] = []
        d = obs_dim + action_dim
        for w in hidden:
            layers += [EnsembleLinear(num_qs, d, w), nn.GELU()]
            if layer_norm:
                layers.append(EnsembleLayerNorm(num_qs, w))
            d = w
        layers.append(EnsembleLinear(num_qs, d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.normalizer(obs), actions], dim=-1)  # (B, O + D)
        x = x.unsqueeze(0).expand(self.num_qs, *x.shape)  # (E, B, O + D)
        return self.net(x).squeeze(-1)  # (E, B)


def aggregate_q(q: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce the ensemble axis (0) with 'mean' or 'min'."""
    if how == "mean":
        return q.mean(dim=0)
    if how == "min":
        return q.min(dim=0).values
    raise ValueError(f"q_agg must be 'mean' or 'min', got {how!r}")


class TimeEmbedding(nn.Module):
    """Flow time t ∈ [0, 1] as a scalar, or as fixed Fourier features when dims > 0."""

    freqs: torch.Tensor

    def __init__(self, dims: int = 0) -> None:
        super().__init__()
        self.out_dim = dims if dims > 0 else 1
        freqs = torch.arange(1, max(dims // 2, 1) + 1, dtype=torch.float32) * math.pi
        self.register_buffer("freqs", freqs)
        self.fourier = dims > 0

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B, 1)
        if not self.fourier:
            return t
        angles = t * self.freqs  # (B, dims/2)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class FlowActor(nn.Module):
    """Velocity field v(s, x_t, t) of the flow-matching behaviour policy over flat chunks."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: Sequence[int], layer_norm: bool = False, time_dims: int = 0
    ) -> None:
        super().__init__()
        self.normalizer = ObsNormalizer(obs_dim)
        self.time = TimeEmbedding(time_dims)
        self.mlp = MLP(obs_dim + action_dim + self.time.out_dim, hidden, action_dim, layer_norm)

    def forward(self, obs: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(self.normalizer(obs), x_t, t)

    def velocity(self, obs_n: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v on an already-normalized observation (lets samplers normalize once, not per step)."""
        return self.mlp(torch.cat([obs_n, x_t, self.time(t)], dim=-1))


class OneStepActor(nn.Module):
    """QC-FQL's distilled policy μ(s, z): noise to chunk in one pass."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int], layer_norm: bool = False) -> None:
        super().__init__()
        self.normalizer = ObsNormalizer(obs_dim)
        self.mlp = MLP(obs_dim + action_dim, hidden, action_dim, layer_norm)

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.normalizer(obs), z], dim=-1))
