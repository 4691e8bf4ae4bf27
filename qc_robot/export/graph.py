"""The module that torch.onnx traces: acting rule + action un-normalization, in robot units.

Two forms of the same computation:

- ``lean=False`` ("naive") calls :class:`~qc_robot.agent.acting.ActingPolicy` as it is.
- ``lean=True`` rewrites best-of-N so the graph does less work per call (measured on one core
  at the reference config: ~4.2 ms vs ~4.9 ms for the naive export, see
  docs/benchmarks_inference.md):

  * the first Linear of the flow actor takes ``[obs_n, x_t, time(t)]``; its observation part is
    the same for all N samples and all Euler steps, and its time part is a constant per step.
    So ``obs_n @ W_obs`` is computed once per observation and ``b + time(t_i) @ W_t`` is folded
    into one constant bias per step; each step only multiplies the (B·N, D) chunk by ``W_x``.
  * the critic's first (ensemble) layer is split the same way, and the ensemble runs as E plain
    MLPs (2-D Gemms, whose weights onnxruntime pre-packs) instead of batched 3-D MatMuls.
  * exact GELU is written in the operand order onnxruntime fuses into one Gelu kernel.

  Weights are read from the trained modules at export time. Only the order of floating-point
  summation changes; export checks parity against the naive rule on fixed noise.

The one-step actor (QC-FQL) is a single MLP pass: there is nothing to hoist, both forms match.

:meth:`ExportGraph.continued` is the same acting rule continued from a previous chunk
(real-time chunking, :mod:`qc_robot.agent.rtc`), from three more inputs: ``prev_actions``
(B, H, A) in robot units, aligned to the new chunk's steps, ``prev_delay`` (B,) the steps to
freeze and ``prev_len`` (B,) how many steps the previous chunk still covers. Its first
``min(prev_delay, prev_len)`` actions are ``prev_actions``' exactly. :class:`ContinuedGraph`
is that method as a module, traced separately (the exporter joins the two with an ``If``).

Image policies: both take the images after their other inputs, one uint8 (B, H, W, C) tensor per
image key in the policy's key order; the encoder runs once per observation and the rest of the
graph is the state-only graph on its features (the flat ``observation`` is then the state alone).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from qc_robot.agent import rtc as rtc_rule
from qc_robot.agent.acting import ActingPolicy, best_of_n, one_step
from qc_robot.agent.networks import EnsembleLayerNorm, EnsembleLinear, aggregate_q


class ExportGraph(nn.Module):
    """observation (B, O) + noise → actions (B, H, A) in robot units, clipped to [low, high].

    ``noise`` is (B, N, D) for best-of-N and (B, D) for the one-step actor (D = H·A), as for
    :class:`ActingPolicy`.
    """

    scale: torch.Tensor
    offset: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    flow_w_obs: torch.Tensor
    flow_w_x: torch.Tensor
    flow_step_bias: torch.Tensor

    def __init__(
        self,
        acting: ActingPolicy,
        action_low: np.ndarray,
        action_high: np.ndarray,
        lean: bool = True,
        max_guidance: float = rtc_rule.MAX_GUIDANCE,
    ) -> None:
        super().__init__()
        self.acting = acting
        self.max_guidance = max_guidance
        low = torch.as_tensor(np.asarray(action_low, np.float32))
        high = torch.as_tensor(np.asarray(action_high, np.float32))
        # a = low + (x + 1)/2·(high − low) = x·scale + offset, per action dimension
        self.register_buffer("scale", (high - low) / 2.0)
        self.register_buffer("offset", (high + low) / 2.0)
        self.register_buffer("low", low)
        self.register_buffer("high", high)
        self.lean = lean and acting.actor_type == "best_of_n"
        if self.lean:
            self._prepare_lean()

    @torch.no_grad()
    def _prepare_lean(self) -> None:
        flow, critic = self.acting.flow, self.acting.critic
        assert critic is not None
        layers = list(flow.mlp.net)
        first = layers[0]
        assert isinstance(first, nn.Linear)
        obs_dim = feature_dim_of(self.acting)  # what the networks take (state or features)
        d = self.acting.chunk_len * self.acting.action_dim
        w = first.weight  # (H1, O + D + T)
        self.register_buffer("flow_w_obs", w[:, :obs_dim].t().contiguous())  # (O, H1)
        self.register_buffer("flow_w_x", w[:, obs_dim : obs_dim + d].t().contiguous())  # (D, H1)
        w_t = w[:, obs_dim + d :]  # (H1, T)
        steps = self.acting.flow_steps
        t = torch.arange(steps, dtype=torch.float32).unsqueeze(1) / steps  # (S, 1)
        # one bias per Euler step: b + time(t_i) @ W_t; t_i = i/steps as in euler_sample
        self.register_buffer("flow_step_bias", first.bias + flow.time(t) @ w_t.t())  # (S, H1)
        self.flow_rest = nn.Sequential(*_fusable(layers[1:]))

        # The critic ensemble as E plain MLPs: ONNX MatMul with a 3-D (batched) weight gets no
        # pre-packed weights in onnxruntime and ran ~2x slower than E separate Gemms.
        c_layers = list(critic.net)
        c_first = c_layers[0]
        assert isinstance(c_first, EnsembleLinear)
        cw = c_first.weight  # (E, O + D, H1)
        members = []
        for k in range(critic.num_qs):
            first_k = nn.Linear(obs_dim, cw.shape[2])  # observation part, once per observation
            first_k.weight.copy_(cw[k, :obs_dim, :].t())
            first_k.bias.copy_(c_first.bias[k, 0])
            w_a = nn.Linear(d, cw.shape[2], bias=False)  # chunk part, once per sample
            w_a.weight.copy_(cw[k, obs_dim:, :].t())
            members.append(nn.ModuleList([first_k, w_a, _member_mlp(_fusable(c_layers[1:]), k)]))
        self.critic_members = nn.ModuleList(members)

    def forward(self, observation: torch.Tensor, noise: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        if self.acting.encoder is not None:
            observation = self.acting.features(observation, images)  # (B, F)
        if self.lean:
            x = self._lean_best_of_n(observation, noise)  # (B, H, A)
        else:
            x = self.acting(observation, noise) if self.acting.encoder is None else self._on_features(observation, noise)
        a = x * self.scale + self.offset
        return torch.minimum(torch.maximum(a, self.low), self.high)

    def continued(
        self,
        observation: torch.Tensor,
        noise: torch.Tensor,
        prev_actions: torch.Tensor,
        prev_delay: torch.Tensor,
        prev_len: torch.Tensor,
        *images: torch.Tensor,
    ) -> torch.Tensor:
        """The RTC output (B, H, A) in robot units: frozen prefix + guided continuation."""
        acting = self.acting
        if acting.encoder is not None:
            observation = acting.features(observation, images)  # (B, F)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        prev_agent = (prev_actions - self.offset) / safe  # (B, H, A) in agent space
        hoisted = critic = None
        if self.lean:
            hoisted = rtc_rule.Hoisted(self.flow_w_obs, self.flow_w_x, self.flow_step_bias, list(self.flow_rest))
            critic = self._member_q
        x = rtc_rule.rtc_act(acting, observation, noise, prev_agent, prev_delay, prev_len, self.max_guidance,
                             hoisted, critic)  # (B, H, A)
        frozen = rtc_rule.prefix_mask(acting.chunk_len, prev_delay, prev_len).unsqueeze(-1)  # (B, H, 1)
        # the prefix in robot units is the previous chunk's own numbers (no agent-space round trip)
        a = torch.where(frozen, prev_actions, x * self.scale + self.offset)
        return torch.minimum(torch.maximum(a, self.low), self.high)

    def _on_features(self, feat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The naive acting rule on already-encoded features: (B, H, A) in agent space."""
        acting = self.acting
        if acting.actor_type == "best_of_n":
            assert acting.critic is not None
            flat = best_of_n(acting.flow, acting.critic, feat, noise, acting.flow_steps, acting.q_agg)
        else:
            assert acting.one_step_actor is not None
            flat = one_step(acting.one_step_actor, feat, noise)
        return flat.reshape(feat.shape[0], acting.chunk_len, acting.action_dim)  # (B, H, A)

    def _member_q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The lean per-member critic: (obs (B, O), chunk (B, D)) → (E, B), for RTC ranking."""
        critic = self.acting.critic
        assert critic is not None
        obs_c = critic.normalizer(obs)  # (B, O)
        qs = []
        for member in self.critic_members:
            parts = cast(nn.ModuleList, member)
            first_k, w_a, rest = parts[0], parts[1], parts[2]
            qs.append(rest(w_a(actions) + first_k(obs_c)))  # (B, 1)
        return torch.stack(qs, dim=0).squeeze(-1)  # (E, B)

    def _lean_best_of_n(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        acting = self.acting
        flow, critic = acting.flow, acting.critic
        assert critic is not None
        b, n, d = noise.shape
        h1 = self.flow_w_obs.shape[1]
        obs_f = flow.normalizer(obs) @ self.flow_w_obs  # (B, H1), once per observation
        obs_f = obs_f.unsqueeze(1).expand(b, n, h1).reshape(b * n, h1)  # (B·N, H1)
        x = noise.reshape(b * n, d)  # (B·N, D)
        steps = acting.flow_steps
        dt = 1.0 / steps
        for i in range(steps):
            pre = torch.addmm(obs_f + self.flow_step_bias[i], x, self.flow_w_x)  # (B·N, H1)
            x = x + dt * self.flow_rest(pre)
        x = x.clamp(-1.0, 1.0)  # (B·N, D)

        obs_c = critic.normalizer(obs)  # (B, O)
        qs = []
        for member in self.critic_members:
            parts = cast(nn.ModuleList, member)
            first_k, w_a, rest = cast(nn.Linear, parts[0]), parts[1], parts[2]
            hc = first_k.out_features
            obs_k = first_k(obs_c).unsqueeze(1).expand(b, n, hc).reshape(b * n, hc)  # (B·N, Hc)
            qs.append(rest(w_a(x) + obs_k))  # (B·N, 1)
        q_all = torch.stack(qs, dim=0).squeeze(-1)  # (E, B·N)
        q = aggregate_q(q_all, acting.q_agg).reshape(b, n)  # (B, N)
        best = q.argmax(dim=1, keepdim=True)  # (B, 1)
        idx = best.unsqueeze(-1).expand(b, 1, d)  # (B, 1, D)
        chosen = torch.gather(x.reshape(b, n, d), 1, idx)  # (B, 1, D)
        return chosen.reshape(b, acting.chunk_len, acting.action_dim)  # (B, H, A)


class ContinuedGraph(nn.Module):
    """:meth:`ExportGraph.continued` as the module to trace: five inputs, one output."""

    def __init__(self, graph: ExportGraph) -> None:
        super().__init__()
        self.inner = graph

    def forward(self, observation: torch.Tensor, noise: torch.Tensor, prev_actions: torch.Tensor,
                prev_delay: torch.Tensor, prev_len: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        return self.inner.continued(observation, noise, prev_actions, prev_delay, prev_len, *images)


def obs_dim_of(acting: ActingPolicy) -> int:
    """Width of the flat ``observation`` input: the state (the encoder's, for image policies),
    read from a normalizer."""
    if acting.encoder is not None:
        return int(acting.encoder.state_dim)
    return feature_dim_of(acting)


def feature_dim_of(acting: ActingPolicy) -> int:
    """Width of what the networks take (the observation, or the encoder's features)."""
    return int(cast(torch.Tensor, acting.flow.normalizer.mean).shape[0])


@torch.no_grad()
def _member_mlp(layers: list[nn.Module], k: int) -> nn.Sequential:
    """Member k of a stack of Ensemble{Linear,LayerNorm} + activations, as plain torch layers."""
    out: list[nn.Module] = []
    for m in layers:
        if isinstance(m, EnsembleLinear):
            lin = nn.Linear(m.weight.shape[1], m.weight.shape[2])
            lin.weight.copy_(m.weight[k].t())
            lin.bias.copy_(m.bias[k, 0])
            out.append(lin)
        elif isinstance(m, EnsembleLayerNorm):
            ln = nn.LayerNorm(m.dim)
            ln.weight.copy_(m.weight[k, 0])
            ln.bias.copy_(m.bias[k, 0])
            out.append(ln)
        else:  # parameter-free (activation)
            out.append(m)
    return nn.Sequential(*out)


class FusableGelu(nn.Module):
    """Exact (erf) GELU written as ``(x·0.5)·(1 + erf(x/√2))``.

    torch.onnx (dynamo) decomposes nn.GELU below opset 20 as ``x·(0.5·(1 + erf(x/√2)))``, an
    order onnxruntime's Gelu fusion does not match: the ops then run one by one (~1.3 ms of a
    5.7 ms best-of-N call). This order is matched and fused into one Gelu kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0.5) * (1.0 + torch.erf(x / 1.4142135623730951))


def _fusable(layers: list[nn.Module]) -> list[nn.Module]:
    """Swap exact nn.GELU for :class:`FusableGelu`; other layers are kept as they are."""
    return [
        FusableGelu() if isinstance(m, nn.GELU) and m.approximate == "none" else m for m in layers
    ]
