"""No-grad sampling inside an update, without the waste of running the training modules.

The best-of-N target is ~95% of a QC update: B·N·flow_steps = 81,920 flow passes and 8,192
ranking passes of a two-member critic per update at the reference config. Run through the
``nn.Module`` forward, each hidden layer is three memory passes on top of its GEMM (matmul,
bias-add, GELU, and for the critic a LayerNorm plus a per-member scale and shift); the flow's
input is re-concatenated every Euler step; the bf16 copy casts its input and output per call.

Here each hidden layer is one oneDNN call with bias and GELU fused into the GEMM's epilogue
(``torch.ops.mkldnn._linear_pointwise``; AMX for bf16 on CPUs that have it), LayerNorm takes its
per-member affine parameters directly, and the flow's input buffer is written once with the
observation part and updated in place with x_t and t each step. The arithmetic is the same:
fp32 in fp32 gives the module's result to rounding; where the hardware lacks the fused op
(CUDA, builds without oneDNN) the same code runs with ``F.linear`` + ``F.gelu``.

Weights are copied from the live networks by :meth:`refresh` (once per update), never saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qc_robot.agent.networks import (
    ChunkCritic,
    EnsembleLayerNorm,
    EnsembleLinear,
    FlowActor,
    aggregate_q,
)


def fused_linear_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's fused linear (+GELU) exists and runs here in ``dtype`` (CPU builds with mkldnn;
    bf16 only on CPUs oneDNN has a bf16 kernel for: an AVX2-only CPU has none)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(2, 3, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 3, dtype=dtype), torch.zeros(4, dtype=dtype), "gelu", [],
                                           "none")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool, fused: bool) -> torch.Tensor:
    """y = x wᵀ + b, then exact (erf) GELU if asked; one oneDNN call when ``fused``."""
    if fused:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, w, b)
    return F.gelu(y) if gelu else y


@dataclass
class _Layer:
    weight: torch.Tensor  # (out, in) in the sampler's dtype
    bias: torch.Tensor  # (out,)
    gelu: bool
    ln_weight: torch.Tensor | None = None  # (out,) LayerNorm affine, when the layer has one
    ln_bias: torch.Tensor | None = None


class _MLPCopy:
    """One MLP's weights as a list of layers; ``src`` are the live tensors they copy."""

    def __init__(self, layers: list[_Layer], src: list[torch.Tensor]) -> None:
        self.layers, self._src = layers, src
        self._dst = [t for lay in layers for t in (lay.weight, lay.bias, lay.ln_weight, lay.ln_bias) if t is not None]

    def forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        for lay in self.layers:
            x = _linear(x, lay.weight, lay.bias, lay.gelu, fused)
            if lay.ln_weight is not None:
                x = F.layer_norm(x, (x.shape[-1],), lay.ln_weight, lay.ln_bias)
        return x


def _mlp_copies(seq: nn.Sequential, dtype: torch.dtype, members: int | None) -> list[_MLPCopy]:
    """Split a Sequential of (Ensemble)Linear / GELU / (Ensemble)LayerNorm into per-member MLPs."""
    mods = list(seq)
    out: list[_MLPCopy] = []
    for k in range(members or 1):
        layers: list[_Layer] = []
        src: list[torch.Tensor] = []
        for i, m in enumerate(mods):
            if isinstance(m, (nn.Linear, EnsembleLinear)):
                gelu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.GELU)
                if isinstance(m, EnsembleLinear):
                    w_src, b_src = m.weight[k].t(), m.bias[k, 0]  # (out, in), (out,)
                else:
                    w_src, b_src = m.weight, m.bias
                layers.append(_Layer(torch.empty(w_src.shape, dtype=dtype, device=w_src.device),
                                     torch.empty(b_src.shape, dtype=dtype, device=b_src.device), gelu))
                src += [w_src, b_src]
            elif isinstance(m, (nn.LayerNorm, EnsembleLayerNorm)):
                if isinstance(m, EnsembleLayerNorm):
                    lw, lb = m.weight[k, 0], m.bias[k, 0]
                else:
                    lw, lb = m.weight, m.bias
                layers[-1].ln_weight = torch.empty(lw.shape, dtype=dtype, device=lw.device)
                layers[-1].ln_bias = torch.empty(lb.shape, dtype=dtype, device=lb.device)
                src += [lw, lb]
            elif not isinstance(m, nn.GELU):
                raise TypeError(f"fast sampling does not know layer {type(m).__name__}")
        out.append(_MLPCopy(layers, src))
    return out


class FastFlow:
    """The flow actor's Euler sampler on a (possibly bf16) weight copy; Euler state in fp32."""

    def __init__(self, flow: FlowActor, dtype: torch.dtype, fused: bool) -> None:
        if flow.time.fourier:
            raise ValueError("fast sampling supports the scalar flow time only (fourier_time_dims=0)")
        self.flow, self.dtype, self.fused = flow, dtype, fused
        (self.mlp,) = _mlp_copies(flow.mlp.net, dtype, None)

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_(self.mlp._dst, [t.detach() for t in self.mlp._src])

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """``acting.euler_sample`` on raw obs (R, O) and noise (R, D) → clipped x_1 (R, D)."""
        r, o = obs.shape
        d = noise.shape[1]
        inp = torch.empty(r, o + d + 1, dtype=self.dtype, device=obs.device)  # [obs_n | x_t | t]
        inp[:, :o] = self.flow.normalizer(obs)  # written once, not once per step
        x = noise.float().clone()
        dt = 1.0 / steps
        for i in range(steps):
            inp[:, o : o + d] = x
            inp[:, o + d].fill_(i * dt)
            x += dt * self.mlp.forward(inp, self.fused).float()
        return x.clamp_(-1.0, 1.0)


class FastCritic:
    """fp32 copy of the chunk critic ensemble for ranking candidates: returns (E, R)."""

    def __init__(self, critic: ChunkCritic, fused: bool) -> None:
        self.critic, self.fused = critic, fused
        self.members = _mlp_copies(critic.net, torch.float32, critic.num_qs)

    @torch.no_grad()
    def refresh(self) -> None:
        dst = [t for m in self.members for t in m._dst]
        src = [t.detach() for m in self.members for t in m._src]
        torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.critic.normalizer(obs), actions], dim=-1)  # (R, O + D)
        return torch.stack([m.forward(x, self.fused).squeeze(-1) for m in self.members])  # (E, R)


def fast_best_of_n(
    flow: FastFlow, critic: FastCritic, obs: torch.Tensor, noise: torch.Tensor, steps: int, q_agg: str
) -> torch.Tensor:
    """``acting.best_of_n`` on the fast copies: obs (B, O), noise (B, N, D) → chunk (B, D)."""
    b, n, d = noise.shape
    obs_rep = obs.unsqueeze(1).expand(b, n, obs.shape[-1]).reshape(b * n, -1)  # (B·N, O)
    samples = flow.sample(obs_rep, noise.reshape(b * n, d), steps)  # (B·N, D)
    q = aggregate_q(critic.q(obs_rep, samples), q_agg).reshape(b, n)  # (B, N)
    best = q.argmax(dim=1)  # (B,)
    return samples.reshape(b, n, d)[torch.arange(b, device=obs.device), best]  # (B, D)
