"""How often low-precision Euler passes change QC's best-of-N choice, on trained-like networks.

Used by ``tests/test_precision.py`` (the bar: >= 99% of states keep the all-fp32 choice) and by
``benchmarks/bench_update.py`` (which reports the rate on more states). A trained-like flow is
fitted for a few updates to a multimodal, state-dependent chunk distribution; the critic's
output layer is rescaled so that Q ≈ ``level`` with within-state std ``sigma`` over the
candidates: the values and spreads of a trained OGBench critic (|Q| ≈ 100–200, where bf16's
step is 0.5–1.0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qc_robot.agent.acting import euler_sample
from qc_robot.agent.networks import ChunkCritic, FlowActor, aggregate_q


@torch.enable_grad()
def trained_like_flow(obs_dim: int, chunk_dim: int, hidden: Sequence[int], seed: int = 0,
                      updates: int = 60, batch: int = 128) -> FlowActor:
    """A flow fitted for ``updates`` Adam steps to four state-dependent modes of chunks."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flow = FlowActor(obs_dim, chunk_dim, hidden)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    goals = torch.rand(4, chunk_dim, generator=g) * 1.6 - 0.8
    for _ in range(updates):
        obs = torch.randn(batch, obs_dim, generator=g)
        mode = (obs[:, 0] > 0).long() * 2 + torch.randint(0, 2, (batch,), generator=g)
        x1 = goals[mode] + 0.3 * torch.tanh(obs[:, 1:2]) + 0.05 * torch.randn(batch, chunk_dim, generator=g)
        x1 = x1.clamp(-1, 1)
        x0, t = torch.randn(batch, chunk_dim, generator=g), torch.rand(batch, 1, generator=g)
        loss = (flow(obs, (1 - t) * x0 + t * x1, t) - (x1 - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.requires_grad_(False)


@torch.no_grad()
def scaled_critic(obs_rep: torch.Tensor, candidates: torch.Tensor, n: int, hidden: Sequence[int],
                  level: float, sigma: float, seed: int = 1) -> ChunkCritic:
    """A critic rescaled so its Q over ``candidates`` (R = B·N rows) has mean ``level`` and mean
    within-state std ``sigma``."""
    torch.manual_seed(seed)
    critic = ChunkCritic(obs_rep.shape[1], candidates.shape[1], hidden).requires_grad_(False)
    q = aggregate_q(critic(obs_rep, candidates), "mean").reshape(-1, n)
    c = sigma / q.std(dim=1).mean().item()
    last: torch.nn.Linear = critic.net[-1]  # type: ignore[assignment]  # the output layer
    last.weight.mul_(c)
    last.bias.mul_(c).add_(level - c * q.mean().item())
    return critic


@torch.no_grad()
def choice_agreement(
    flow: FlowActor,
    sample_lp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    obs: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    hidden: Sequence[int],
    cases: Sequence[tuple[float, float]] = ((-100.0, 0.5), (-200.0, 2.0)),
) -> list[dict[str, float]]:
    """For each (level, sigma): the fraction of states whose best-of-N choice with
    ``sample_lp`` (low-precision Euler, fp32 ranking) equals the all-fp32 choice, and the same
    for fp32 candidates ranked with bf16-rounded Q (the old bf16 critic's effect)."""
    b, n, d = noise.shape
    obs_rep = obs.repeat_interleave(n, 0)  # (B·N, O)
    flat = noise.reshape(b * n, d)
    cand32 = euler_sample(flow, obs_rep, flat, steps)  # (B·N, D)
    cand_lp = sample_lp(obs_rep, flat)
    out = []
    for level, sigma in cases:
        critic = scaled_critic(obs_rep, cand32, n, hidden, level, sigma)
        q32 = aggregate_q(critic(obs_rep, cand32), "mean").reshape(b, n)
        q_lp = aggregate_q(critic(obs_rep, cand_lp), "mean").reshape(b, n)  # fp32 ranking
        out.append({
            "level": level, "sigma": sigma, "q_mean": q32.mean().item(),
            "max_abs_da": (cand32 - cand_lp).abs().max().item(),
            "match": (q32.argmax(1) == q_lp.argmax(1)).float().mean().item(),
            "bf16_rank_match": (q32.bfloat16().argmax(1) == q32.argmax(1)).float().mean().item(),
        })
    return out
