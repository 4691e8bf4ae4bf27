"""Slow learning check (``pytest -m slow tests/test_learning_slow.py``; ~2–4 min on 2 cores).

A task where behaviour cloning fails and Q-learning succeeds, so only a working critic, target
and best-of-N ranking pass. A point on [-1, 1] must reach a goal (both in the observation);
each step moves it by 0.1·a, reward −1 per step, success (a true termination, reward 0) within
0.05 of the goal, 60 steps allowed. The offline data is a random walk (actions i.i.d.
N(0, 0.6²) clipped): cloning it reaches the goal rarely, a chunk critic trained on it learns
which way the goal is, and best-of-N then picks the chunks that go there.

The same run with the critic's bootstrap cut (``discount = 0``: every chunk looks the same, −1)
is the broken control: it must stay near the behaviour policy's success rate. The test thus
fails if the critic or its target stops carrying the return, not only if the code crashes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qc_robot.agent.agent import QCAgent
from qc_robot.config import AgentConfig
from qc_robot.data.replay import ChunkReplay

STEP, RADIUS, LIMIT = 0.1, 0.05, 60
H = 5


def _random_walk_data(episodes: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("observations", "actions", "rewards", "terminals",
                                                         "masks", "next_observations")}
    for _ in range(episodes):
        x, g = rng.uniform(-1, 1, 2)
        for t in range(length):
            a = float(np.clip(rng.normal(0, 0.6), -1, 1))
            nx = float(np.clip(x + STEP * a, -1, 1))
            done = abs(nx - g) < RADIUS
            cols["observations"].append(np.array([x, g], np.float32))
            cols["actions"].append(np.array([a], np.float32))
            cols["rewards"].append(np.float32(0.0 if done else -1.0))
            cols["terminals"].append(np.float32(done or t == length - 1))
            cols["masks"].append(np.float32(0.0 if done else 1.0))
            cols["next_observations"].append(np.array([nx, g], np.float32))
            x = nx
            if done:
                break
    return {k: np.stack(v) for k, v in cols.items()}


def _success_rate(agent: QCAgent, episodes: int, seed: int) -> float:
    """All episodes in parallel; each chunk runs open-loop in full before the next query."""
    rng = np.random.default_rng(seed)
    x, g = rng.uniform(-1, 1, episodes), rng.uniform(-1, 1, episodes)
    done = np.zeros(episodes, bool)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(LIMIT // H):
        chunk = agent.act(np.stack([x, g], 1).astype(np.float32), generator=gen)  # (E, H, 1)
        for k in range(H):
            x = np.where(done, x, np.clip(x + STEP * chunk[:, k, 0], -1, 1))
            done |= np.abs(x - g) < RADIUS
    return float(done.mean())


def _train(discount: float, updates: int = 3000, seed: int = 0) -> tuple[float, float]:
    """(best-of-N success, flow-only success) after ``updates`` offline updates."""
    torch.manual_seed(seed)
    cfg = AgentConfig(hidden_dims=[128, 128], batch_size=256, horizon=H, num_samples=16, flow_steps=10,
                      discount=discount, lr=1e-3, device="cpu")
    agent = QCAgent(cfg, obs_dim=2, act_dim=1, seed=seed)
    data = _random_walk_data(episodes=300, length=100, seed=seed)
    replay = ChunkReplay(2, 1, len(data["rewards"]))
    replay.add_offline(data)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        agent.update(replay.sample(cfg.batch_size, H, cfg.discount, generator=gen))
    qc = _success_rate(agent, 200, seed=123)
    bc = QCAgent(AgentConfig(**{**cfg.__dict__, "num_samples": 1}), obs_dim=2, act_dim=1, seed=seed)
    bc.load_state_dict(agent.state_dict())  # the same flow, no ranking: behaviour cloning
    return qc, _success_rate(bc, 200, seed=123)


@pytest.mark.slow
def test_qc_learns_where_cloning_fails_and_a_cut_critic_does_not() -> None:
    torch.set_num_threads(2)
    qc, bc = _train(discount=0.99)
    broken, _ = _train(discount=0.0)
    print(f"QC {qc:.2f}  flow alone {bc:.2f}  critic without bootstrap {broken:.2f}")
    assert bc < 0.5, bc  # cloning the random walk is not enough
    assert qc >= 0.85, qc
    assert qc >= bc + 0.3
    assert broken < qc - 0.3, broken
