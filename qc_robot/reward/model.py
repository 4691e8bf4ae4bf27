"""The success detector network: normalized state and IMPALA image features → P(success).

The state normalizer (statistics of the training frames) and the image encoder's /255 are part
of the module, so the exported graph takes raw observations, as the policy's does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from qc_robot.agent.encoder import ImpalaEncoder
from qc_robot.agent.networks import MLP, ObsNormalizer


class DetectorNet(nn.Module):
    """``forward(observation (B, O), *images (B, H, W, C) uint8) -> probability (B,)``."""

    def __init__(self, state_dim: int, image_shapes: dict[str, tuple[int, int, int]], hidden: Sequence[int],
                 channels: Sequence[int] = (16, 32, 32), blocks: int = 1, image_dim: int = 64) -> None:
        super().__init__()
        self.state_dim = state_dim
        self.image_keys = list(image_shapes)
        self.normalizer = ObsNormalizer(state_dim)
        # a list, not a ModuleDict: camera names may hold characters a module name cannot
        self.convs = nn.ModuleList(ImpalaEncoder(image_shapes[k], channels, blocks, image_dim)
                                   for k in self.image_keys)
        self.head = MLP(state_dim + image_dim * len(self.image_keys), hidden, 1)

    def set_stats(self, state: np.ndarray, eps: float = 1e-3) -> None:
        """Normalize the state with these frames' mean and std (std floored at ``eps``)."""
        s = torch.as_tensor(state, dtype=torch.float32)
        self.normalizer.set_stats(s.mean(0), s.std(0) if len(s) > 1 else torch.ones(self.state_dim), eps)

    def logits(self, observation: torch.Tensor, images: Sequence[torch.Tensor],
               state_noise: float = 0.0) -> torch.Tensor:
        """(B,) logits; ``state_noise`` (training only): Gaussian noise on the normalized state."""
        z = self.normalizer(observation)  # (B, O)
        if state_noise > 0:
            z = z + state_noise * torch.randn_like(z)
        parts = [z] + [conv(img) for conv, img in zip(self.convs, images, strict=True)]
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)

    def forward(self, observation: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(observation, images))  # (B,)
