"""Image observations for the QC agent: an IMPALA-style conv encoder, random shifts, features.

An image observation is ``uint8 (B, H, W, C)`` HWC RGB (``C = 3·frame_stack`` when frames are
stacked along channels, as the reference's visual runs do). It stays uint8 everywhere outside
the network (replay, wire, ONNX input: a quarter of float32's bytes) and becomes float ``x/255``
only inside :class:`ImpalaEncoder`.

:class:`ObsEncoder` maps ``(state (B, O), images [(B, H, W, C), ...])`` to one flat feature
vector ``(B, O + K·out_dim)``: the normalized state beside one conv feature per camera key. The
critic, the flow and the one-step actor all take that vector as their "observation" (their own
normalizers stay the identity), so everything that works on flat observations (losses, the fused
sampler, best-of-N, RTC, the lean export graph) works on image policies unchanged, and one
encoder pass per observation serves all N best-of-N samples and every Euler step.

The encoder is shared by critic and actors; which losses train it is ``VisionConfig.encoder_grad``
(see :mod:`qc_robot.agent.agent`). The reference (github.com/ColinQiyangLi/qc, ``acfql.py``)
instead gives critic, BC flow and one-step actor an encoder each, trained by that network's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qc_robot.agent.networks import ObsNormalizer


class _ResidualStack(nn.Module):
    """conv 3x3 → max-pool 3x3/2 → ``blocks`` residual blocks (relu-conv-relu-conv + skip)."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(out_ch, out_ch, 3, padding=1))
            for _ in range(blocks)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x))
        for block in self.blocks:
            x = x + block(x)
        return x


class ImpalaEncoder(nn.Module):
    """IMPALA's residual conv stacks (the reference's ``impala_small`` is channels (16, 32, 32)
    with one block each), then relu, flatten and a linear layer + GELU to ``out_dim``.

    Input uint8 (B, H, W, C); the /255 happens here, so the graph that ships takes raw bytes.
    """

    def __init__(self, shape: Sequence[int], channels: Sequence[int], blocks: int, out_dim: int,
                 layer_norm: bool = False) -> None:
        super().__init__()
        h, w, c = (int(s) for s in shape)
        stacks: list[nn.Module] = []
        for ch in channels:
            stacks.append(_ResidualStack(c, int(ch), blocks))
            c = int(ch)
            h, w = (h + 1) // 2, (w + 1) // 2  # max-pool 3x3, stride 2, padding 1
        self.stacks = nn.Sequential(*stacks)
        self.flat_dim = c * h * w
        self.proj = nn.Linear(self.flat_dim, out_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.norm: nn.Module = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()
        self.out_dim = out_dim

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.permute(0, 3, 1, 2).float() / 255.0  # (B, C, H, W) in [0, 1]
        x = torch.relu(self.stacks(x))
        x = x.reshape(x.shape[0], -1)  # (B, C'·H'·W')
        return self.norm(nn.functional.gelu(self.proj(x)))  # (B, out_dim)


class ObsEncoder(nn.Module):
    """(state (B, O), images) → features (B, O + K·out_dim): normalized state, then one conv
    feature per image key in ``image_shapes`` order."""

    def __init__(self, state_dim: int, image_shapes: dict[str, tuple[int, int, int]],
                 channels: Sequence[int], blocks: int, out_dim: int, layer_norm: bool = False) -> None:
        super().__init__()
        if not image_shapes:
            raise ValueError("ObsEncoder needs at least one image key")
        self.state_dim = state_dim
        self.image_keys = list(image_shapes)
        self.image_shapes = {k: tuple(int(s) for s in v) for k, v in image_shapes.items()}
        for k, s in self.image_shapes.items():
            if len(s) != 3 or min(s) < 1:
                raise ValueError(f"image {k!r}: shape must be (H, W, C), got {s}")
        self.normalizer = ObsNormalizer(state_dim)
        # a list, not a ModuleDict: camera names may hold characters a module name cannot
        self.convs = nn.ModuleList(
            ImpalaEncoder(self.image_shapes[k], channels, blocks, out_dim, layer_norm) for k in self.image_keys
        )
        self.feature_dim = state_dim + out_dim * len(self.image_keys)

    def forward(self, state: torch.Tensor, images: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(images) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} image tensors ({self.image_keys}), got {len(images)}")
        parts = [self.normalizer(state)] + [conv(img) for conv, img in zip(self.convs, images, strict=True)]
        return torch.cat(parts, dim=-1)  # (B, F)


def random_shift(img: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ's augmentation on uint8 (B, H, W, C): each image shifted by up to ``pad`` pixels in
    each direction, edges replicated (= pad with the border, then a random H×W crop), one
    shift per image. A gather on the uint8 bytes: no float copy of the batch."""
    if pad <= 0:
        return img
    b, h, w, _ = img.shape
    dev = img.device
    shift = torch.randint(-pad, pad + 1, (b, 2), generator=generator, device=dev)  # (B, 2) dy, dx
    rows = (torch.arange(h, device=dev)[None] + shift[:, :1]).clamp_(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=dev)[None] + shift[:, 1:]).clamp_(0, w - 1)  # (B, W)
    bidx = torch.arange(b, device=dev)[:, None, None]  # (B, 1, 1)
    return img[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
