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

    Image policies also carry ``images`` and ``next_images``: one uint8 (B, H, W, C) tensor per
    image key, in the agent's key order, for s_t and for the bootstrap state s_{t+h}; ``None``
    for state-only agents.
    """

    observations: torch.Tensor  # (B, O)  s_t
    actions: torch.Tensor  # (B, h, A)  a_t..a_{t+h-1}
    rewards: torch.Tensor  # (B, h)
    masks: torch.Tensor  # (B, h)
    terminals: torch.Tensor  # (B, h)
    valid: torch.Tensor  # (B, h)
    next_observations: torch.Tensor  # (B, O)  s_{t+h}, the bootstrap state
    images: list[torch.Tensor] | None = None  # [(B, H, W, C) uint8] per image key, s_t
    next_images: list[torch.Tensor] | None = None  # [(B, H, W, C) uint8] per image key, s_{t+h}

    def to(self, device: torch.device | str) -> ChunkBatch:
        return ChunkBatch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return int(self.observations.shape[0])


def _to(v: torch.Tensor | list[torch.Tensor] | None, device: torch.device | str):  # noqa: ANN202
    if v is None:
        return None
    if isinstance(v, list):
        return [t.to(device) for t in v]
    return v.to(device)


def cat_batches(parts: list[ChunkBatch]) -> ChunkBatch:
    """One batch from several (row axis); image lists are joined key by key."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, object] = {}
    for f in fields(ChunkBatch):
        vals = [getattr(p, f.name) for p in parts]
        if all(v is None for v in vals):
            out[f.name] = None
        elif any(v is None for v in vals):
            raise ValueError(f"cannot join batches with and without {f.name}")
        elif isinstance(vals[0], list):
            out[f.name] = [torch.cat(col) for col in zip(*vals, strict=True)]
        else:
            out[f.name] = torch.cat(vals)
    return ChunkBatch(**out)  # type: ignore[arg-type]
