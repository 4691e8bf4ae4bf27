"""The typed batch of action-chunk transitions that every loss consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ChunkBatch:
    """B chunk transitions starting at s_t, each h steps long (QC_SPEC "Batches").

    ``rewards[:, k]`` is the discounted sum of r_t..r_{t+k} over the valid steps; ``masks[:, k]``
    is 0 once the episode truly terminated (stop bootstrapping); ``terminals[:, k]`` is 1 once the
    episode ended for any reason (termination or time limit); ``valid[:, k]`` is 0 for steps past
    the episode's end (padding).
    """

    observations: torch.Tensor  # (B, O)  s_t
    actions: torch.Tensor  # (B, h, A)  a_t..a_{t+h-1}
    rewards: torch.Tensor  # (B, h)
    masks: torch.Tensor  # (B, h)
    terminals: torch.Tensor  # (B, h)
    valid: torch.Tensor  # (B, h)
    next_observations: torch.Tensor  # (B, O)  s_{t+h}, the bootstrap state

    def to(self, device: torch.device | str) -> ChunkBatch:
        return ChunkBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return int(self.observations.shape[0])
