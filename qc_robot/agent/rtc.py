"""Real-time chunking (RTC): sample the next chunk so it continues the one being executed.

Black, Galliker and Levine (2025), "Real-Time Execution of Action Chunking Flow Policies":
while chunk k runs, chunk k+1 is computed from a recent observation. Its first ``d`` actions
(``d`` = inference delay in control steps) will be executed from chunk k anyway, so they are
*frozen* to chunk k's; the rest is sampled by the flow with an inpainting guidance term that
pulls it toward chunk k's remaining plan, with a soft mask whose weight decays exponentially
across the overlap, so the seam between the two chunks is continuous.

All of it is written with plain tensor ops (the vector-Jacobian product of the velocity MLP is
computed by hand, not by autograd) so the same functions are traced into the ONNX file:
training-free, and the served graph computes exactly what these functions compute.

Conventions (ours, as in :func:`qc_robot.agent.acting.euler_sample`): flow time t runs from 0
(noise) to 1 (data), ``x_t = (1 - t)·x_0 + t·x_1``, Euler steps at ``t_i = i / steps``.
Guided velocity (the paper's Eq. 2–4, ΠGDM): with ``x̂_1 = x_t + (1 - t)·v(s, x_t, t)`` and the
per-element weights ``W``,

    v_guided = v + min(β, (1 - t) / (t · r_t²)) · [e + (1 - t) · J_vᵀ e],  e = W ⊙ (Y − x̂_1),
    r_t² = (1 - t)² / (t² + (1 - t)²)

where ``Y`` is the previous chunk aligned to the new chunk's steps and β the largest guidance
weight (5, as in the paper). The bracket is ``eᵀ ∂x̂_1/∂x_t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qc_robot.agent.acting import ActingPolicy
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor, aggregate_q

MAX_GUIDANCE = 5.0
"""β: the guidance weight's upper bound (the paper's default)."""
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def soft_mask(chunk_len: int, delay: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Guidance weight per chunk step: (B,) delay and overlap → (B, H).

    Step i of the new chunk gets 1 when ``i < d`` (frozen), ``c·(e^c − 1)/(e − 1)`` with
    ``c = (L − i)/(L − d + 1)`` when ``d ≤ i < L`` (exponential decay over the overlap), and 0 when
    ``i ≥ L`` (the previous chunk has no plan there). ``L`` (``overlap``) is how many of the new
    chunk's steps the previous chunk still covers; ``d`` is clamped to ``[0, L]``.
    """
    i = torch.arange(chunk_len, dtype=torch.float32, device=delay.device).unsqueeze(0)  # (1, H)
    ell = overlap.to(torch.float32).clamp(0.0, float(chunk_len)).reshape(-1, 1)  # (B, 1)
    d = torch.minimum(delay.to(torch.float32).clamp(min=0.0).reshape(-1, 1), ell)  # (B, 1)
    c = (ell - i) / (ell - d + 1.0)  # (B, H)
    decay = c * (torch.exp(c) - 1.0) / (math.e - 1.0)
    zero = torch.zeros_like(decay)
    return torch.where(i < d, torch.ones_like(decay), torch.where(i < ell, decay, zero))


def prefix_mask(chunk_len: int, delay: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """(B, H) bool: the frozen steps, ``i < min(d, L)``."""
    i = torch.arange(chunk_len, dtype=torch.float32, device=delay.device).unsqueeze(0)  # (1, H)
    ell = overlap.to(torch.float32).clamp(0.0, float(chunk_len)).reshape(-1, 1)
    d = torch.minimum(delay.to(torch.float32).clamp(min=0.0).reshape(-1, 1), ell)
    return i < d


def per_element(mask: torch.Tensor, action_dim: int) -> torch.Tensor:
    """(B, H) per-step values → (B, H·A) per element of the flat chunk."""
    b, h = mask.shape
    return mask.unsqueeze(-1).expand(b, h, action_dim).reshape(b, h * action_dim)  # (B, H·A)


def guidance_weight(t: float, max_guidance: float = MAX_GUIDANCE) -> float:
    """min(β, (1 − t)/(t·r_t²)); infinite at t = 0, so β there."""
    if t <= 0.0:
        return max_guidance
    r2 = (1.0 - t) ** 2 / (t**2 + (1.0 - t) ** 2)
    if r2 <= 0.0:
        return 0.0
    return min(max_guidance, (1.0 - t) / (t * r2))


# -- the velocity MLP with its vector-Jacobian product, by hand -------------------------------


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d GELU(z)/dz for exact (erf) GELU: Φ(z) + z·φ(z)."""
    return 0.5 * (1.0 + torch.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _forward_cached(layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``layers`` on ``x``; keep each layer's input for the backward pass."""
    inputs = []
    for m in layers:
        inputs.append(x)
        x = m(x)
    return x, inputs


def _backward(layers: list[nn.Module], inputs: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """gᵀ ∂out/∂in through ``layers`` (Linear, exact GELU, LayerNorm), from the cached inputs."""
    for m, x in zip(reversed(layers), reversed(inputs), strict=True):
        if isinstance(m, nn.Linear):
            g = g @ m.weight  # (B, in)
        elif isinstance(m, nn.GELU) or type(m).__name__ == "FusableGelu":
            if isinstance(m, nn.GELU) and m.approximate != "none":
                raise NotImplementedError("RTC guidance supports exact GELU only")
            g = g * _gelu_grad(x)
        elif isinstance(m, nn.LayerNorm):
            mu = x.mean(dim=-1, keepdim=True)
            var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
            inv = torch.rsqrt(var + m.eps)
            xhat = (x - mu) * inv
            gh = g * m.weight if m.weight is not None else g
            g = inv * (gh - gh.mean(dim=-1, keepdim=True) - xhat * (gh * xhat).mean(dim=-1, keepdim=True))
        else:
            raise NotImplementedError(f"RTC guidance cannot differentiate {type(m).__name__}")
    return g


def guided_euler_sample(
    flow: FlowActor,
    obs: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    target: torch.Tensor,
    weights: torch.Tensor,
    max_guidance: float = MAX_GUIDANCE,
    hoisted: Hoisted | None = None,
) -> torch.Tensor:
    """Euler flow sampling guided toward ``target`` where ``weights`` > 0: (B, D), clipped.

    obs (B, O) raw, noise (B, D), target (B, D) in agent space, weights (B, D). With all weights
    zero the guidance term vanishes and this is :func:`~qc_robot.agent.acting.euler_sample`.
    ``hoisted`` gives the first layer split as the lean export keeps it (same values).
    """
    h = hoisted if hoisted is not None else hoist_first_layer(flow, steps)
    obs_n = flow.normalizer(obs)
    base = obs_n @ h.w_obs  # (B, H1): the observation part, once per call
    x = noise
    dt = 1.0 / steps
    for i in range(steps):
        t = i * dt
        pre = torch.addmm(base + h.step_bias[i], x, h.w_x)  # (B, H1)
        v, inputs = _forward_cached(h.rest, pre)  # (B, D)
        err = weights * (target - (x + (1.0 - t) * v))  # (B, D): W ⊙ (Y − x̂_1)
        jv = _backward(h.rest, inputs, err) @ h.w_x.t()  # (B, D): J_vᵀ e
        k = guidance_weight(t, max_guidance)
        x = x + dt * (v + k * (err + (1.0 - t) * jv))
    return x.clamp(-1.0, 1.0)


@dataclass
class Hoisted:
    """The flow MLP's first Linear split by input (observation, chunk, time) plus the layers after
    it: ``pre = obs_n @ w_obs + step_bias[i] + x @ w_x`` at Euler step i."""

    w_obs: torch.Tensor  # (O, H1)
    w_x: torch.Tensor  # (D, H1)
    step_bias: torch.Tensor  # (S, H1): b + time(t_i) @ W_t
    rest: list[nn.Module]


def hoist_first_layer(flow: FlowActor, steps: int) -> Hoisted:
    """Split ``flow``'s first layer for ``steps`` Euler steps (t_i = i / steps)."""
    layers = list(flow.mlp.net)
    first = layers[0]
    assert isinstance(first, nn.Linear)
    o = int(flow.normalizer.mean.shape[0])
    d = first.in_features - o - flow.time.out_dim
    w = first.weight  # (H1, O + D + T)
    t = torch.arange(steps, dtype=torch.float32, device=w.device).unsqueeze(1) / steps  # (S, 1)
    step_bias = first.bias + flow.time(t) @ w[:, o + d :].t()  # (S, H1)
    return Hoisted(w[:, :o].t(), w[:, o : o + d].t(), step_bias, layers[1:])


# -- the acting rules with a previous chunk ---------------------------------------------------


def rtc_best_of_n(
    flow: FlowActor,
    critic: ChunkCritic | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    obs: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    q_agg: str,
    target: torch.Tensor,
    weights: torch.Tensor,
    frozen: torch.Tensor,
    max_guidance: float = MAX_GUIDANCE,
    hoisted: Hoisted | None = None,
) -> torch.Tensor:
    """QC's best-of-N with RTC: N guided samples, prefix frozen, ranked by Q on the whole chunk.

    obs (B, O), noise (B, N, D), target/weights (B, D), frozen (B, D) bool → chunk (B, D). The
    critic scores exactly the chunk that will run: the frozen prefix plus the new part.
    ``critic`` is anything that maps (obs, chunk) to (E, B) Q values (the export passes its
    per-member form).
    """
    b, n, d = noise.shape

    def rep(x: torch.Tensor) -> torch.Tensor:  # (B, K) → (B·N, K)
        return x.unsqueeze(1).expand(b, n, x.shape[-1]).reshape(b * n, -1)

    obs_rep, target_rep = rep(obs), rep(target)
    samples = guided_euler_sample(flow, obs_rep, noise.reshape(b * n, d), steps, target_rep, rep(weights),
                                  max_guidance, hoisted)  # (B·N, D)
    samples = torch.where(rep(frozen.to(torch.float32)) > 0.5, target_rep, samples)
    q = aggregate_q(critic(obs_rep, samples), q_agg).reshape(b, n)  # (B, N)
    best = q.argmax(dim=1)  # (B,)
    return samples.reshape(b, n, d)[torch.arange(b, device=obs.device), best]  # (B, D)


def rtc_one_step(
    actor: OneStepActor, obs: torch.Tensor, noise: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """QC-FQL's closest equivalent: μ(s, z) blended toward the previous chunk by the soft mask.

    The one-step actor has no sampling trajectory to guide, so the soft mask is applied to its
    output: ``W·Y + (1 − W)·μ(s, z)``. W = 1 on the frozen prefix (exactly the previous plan),
    decaying to 0 across the overlap, 0 beyond it (μ's own plan). (B, D) in [−1, 1].
    """
    return weights * target + (1.0 - weights) * actor(obs, noise).clamp(-1.0, 1.0)


def rtc_act(
    acting: ActingPolicy,
    obs: torch.Tensor,
    noise: torch.Tensor,
    prev: torch.Tensor,
    delay: torch.Tensor,
    overlap: torch.Tensor,
    max_guidance: float = MAX_GUIDANCE,
    hoisted: Hoisted | None = None,
    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The acting rule continued from a previous chunk, in agent space.

    obs (B, O); noise as for :class:`ActingPolicy`; prev (B, H, A) in [−1, 1], aligned so that
    ``prev[:, i]`` is the previous chunk's plan for the new chunk's step i; delay and overlap
    (B,) ints (see :func:`soft_mask`). Returns (B, H, A) whose first ``min(d, L)`` steps equal
    ``prev``'s. With overlap 0 it is the plain acting rule (same noise, same result up to rounding).
    ``hoisted`` and ``critic`` let the export pass its rearranged (numerically equal) networks.
    """
    h, a = acting.chunk_len, acting.action_dim
    b = obs.shape[0]
    target = prev.reshape(b, h * a).clamp(-1.0, 1.0)  # (B, D)
    weights = per_element(soft_mask(h, delay, overlap), a)  # (B, D)
    frozen = per_element(prefix_mask(h, delay, overlap).to(torch.float32), a) > 0.5  # (B, D)
    if acting.actor_type == "best_of_n":
        assert acting.critic is not None
        flat = rtc_best_of_n(acting.flow, critic if critic is not None else acting.critic, obs, noise,
                             acting.flow_steps, acting.q_agg, target, weights, frozen, max_guidance, hoisted)
    elif acting.actor_type == "fql":
        assert acting.one_step_actor is not None
        flat = rtc_one_step(acting.one_step_actor, obs, noise, target, weights)
    else:
        raise ValueError(f"unknown actor_type {acting.actor_type!r}")
    return flat.reshape(b, h, a)  # (B, H, A)
