"""bf16 only where it cannot change the best-of-N choice: the ranking critic is fp32.

At the reference size (4×512), with a briefly trained flow and a critic scaled to OGBench-like
values (|Q| ≈ 100–200, candidate spreads σ of 0.5–2 within a state), best-of-N with bf16 Euler
passes and fp32 ranking must pick the same candidate as the all-fp32 rule in >= 99% of states,
while ranking with a bf16 critic (the old default) demonstrably does not.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from qc_robot.agent.acting import euler_sample
from qc_robot.agent.agent import QCAgent, _LowPrecisionCopy
from qc_robot.agent.networks import ChunkCritic, FlowActor, aggregate_q
from qc_robot.config import AgentConfig

O, D, HIDDEN = 37, 25, [512] * 4  # cube-double obs, h = 5 × 5-D actions, the reference width
B, N, STEPS = 100, 32, 10


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(min(2, n))
    yield
    torch.set_num_threads(n)


@torch.enable_grad()
def _trained_flow(seed: int = 0, updates: int = 60) -> FlowActor:
    """A flow fitted for a few updates to a multimodal, state-dependent chunk distribution, so
    its velocity field is shaped like a trained one rather than a random init."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flow = FlowActor(O, D, HIDDEN)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    goals = torch.rand(4, D, generator=g) * 1.6 - 0.8
    for _ in range(updates):
        obs = torch.randn(128, O, generator=g)
        mode = (obs[:, 0] > 0).long() * 2 + torch.randint(0, 2, (128,), generator=g)
        x1 = (goals[mode] + 0.3 * torch.tanh(obs[:, 1:2]) + 0.05 * torch.randn(128, D, generator=g)).clamp(-1, 1)
        x0, t = torch.randn(128, D, generator=g), torch.rand(128, 1, generator=g)
        loss = (flow(obs, (1 - t) * x0 + t * x1, t) - (x1 - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.requires_grad_(False)


@torch.no_grad()
def _scaled_critic(candidates: torch.Tensor, obs_rep: torch.Tensor, level: float, sigma: float) -> ChunkCritic:
    """A critic whose output layer is rescaled so that Q ≈ ``level`` with within-state std
    ``sigma`` over the candidates: the values and spreads of a trained OGBench critic."""
    torch.manual_seed(1)
    critic = ChunkCritic(O, D, HIDDEN).requires_grad_(False)
    q = aggregate_q(critic(obs_rep, candidates), "mean").reshape(B, N)
    c = sigma / q.std(dim=1).mean().item()
    last = critic.net[-1]
    last.weight.mul_(c)
    last.bias.mul_(c).add_(level - c * q.mean().item())
    return critic


@torch.no_grad()
def test_bf16_euler_with_fp32_ranking_matches_the_fp32_choice() -> None:
    flow = _trained_flow()
    lp = _LowPrecisionCopy(flow, "mlp", torch.bfloat16)
    lp.refresh()
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(B, O, generator=g)
    noise = torch.randn(B, N, D, generator=g)
    obs_rep = obs.repeat_interleave(N, 0)  # (B·N, O)
    cand32 = euler_sample(flow, obs_rep, noise.reshape(B * N, D), STEPS).reshape(B, N, D)
    cand16 = euler_sample(lp.module, obs_rep, noise.reshape(B * N, D), STEPS)
    assert 0 < (cand32.reshape(B * N, D) - cand16).abs().max() < 0.05  # bf16 did change the samples
    flat32 = cand32.reshape(B * N, D)
    for level, sigma in ((-100.0, 0.5), (-200.0, 2.0)):
        critic = _scaled_critic(flat32, obs_rep, level, sigma)
        q32 = aggregate_q(critic(obs_rep, flat32), "mean").reshape(B, N)
        q16 = aggregate_q(critic(obs_rep, cand16), "mean").reshape(B, N)  # fp32 ranking
        assert abs(q32.mean().item() - level) < 1.0
        # best_of_n's rule (argmax of the fp32 critic) on each candidate set
        match = (q32.argmax(1) == q16.argmax(1)).float().mean().item()
        assert match >= 0.99, (level, sigma, match)
        # The old default ranked with a bf16 critic: at these values it picks "one of the
        # top few", far below the bar. This is what the test is able to catch.
        if sigma < 1.0:
            bf16_match = (q32.bfloat16().argmax(1) == q32.argmax(1)).float().mean().item()
            assert bf16_match < 0.9, (level, sigma, bf16_match)


def test_agent_ranks_its_target_with_the_fp32_critic() -> None:
    cfg = AgentConfig(hidden_dims=[32, 32], num_samples=8, flow_steps=3, batch_size=16, sample_dtype="bfloat16")
    agent = QCAgent(cfg, 6, 2, seed=0)
    assert agent.sample_dtype == torch.bfloat16
    assert agent._sampling["critic"] is agent.critic  # the live fp32 critic, not a copy
    assert all(p.dtype == torch.float32 for p in agent._sampling["critic"].parameters())
    assert any(p.dtype == torch.bfloat16 for p in agent._sampling["flow"].parameters())
    for lp in agent._lp:
        lp.refresh()
    obs, noise = torch.randn(16, 6), torch.randn(agent.noise_shape(16))
    with torch.no_grad():
        chosen = agent._target_actions(obs, noise)  # (16, 10)
        cands = euler_sample(agent._sampling["flow"], obs.repeat_interleave(8, 0), noise.reshape(-1, 10), 3)
        q = aggregate_q(agent.critic(obs.repeat_interleave(8, 0), cands), "mean").reshape(16, 8)
    torch.testing.assert_close(chosen, cands.reshape(16, 8, 10)[torch.arange(16), q.argmax(1)])
