"""Each loss against values computed by hand, on tiny hand-built batches and networks.

Networks with ``hidden=[]`` are single linear maps whose weights we set, so every expected value
is plain arithmetic (or an independent numpy version of the formula).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qc_robot.agent.losses import (
    LossNoise,
    critic_loss,
    distill_loss,
    flow_bc_loss,
    q_loss,
    total_loss,
)
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor
from qc_robot.config import AgentConfig
from qc_robot.data.batch import ChunkBatch


def _t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def linear_critic(weights: np.ndarray, biases: np.ndarray) -> ChunkCritic:
    """Q_k(s, a) = weights[k] · [s, a] + biases[k] (identity normalizer)."""
    e, d = weights.shape
    obs_dim = 1
    critic = ChunkCritic(obs_dim, d - obs_dim, hidden=[], num_qs=e)
    with torch.no_grad():
        lin = critic.net[0]
        lin.weight.copy_(_t(weights)[:, :, None])  # (E, in, 1)
        lin.bias.copy_(_t(biases)[:, None, None])  # (E, 1, 1)
    return critic


def linear_flow(obs_dim: int, d: int, weight: np.ndarray, bias: np.ndarray) -> FlowActor:
    """v(s, x, t) = weight @ [s, x, t] + bias."""
    flow = FlowActor(obs_dim, d, hidden=[])
    with torch.no_grad():
        flow.mlp.net[0].weight.copy_(_t(weight))
        flow.mlp.net[0].bias.copy_(_t(bias))
    return flow


def make_batch(
    rewards: list[list[float]],
    masks: list[list[float]],
    terminals: list[list[float]],
    actions: np.ndarray | None = None,
) -> ChunkBatch:
    r = _t(rewards)
    b, h = r.shape
    term = _t(terminals)
    valid = torch.ones_like(term)
    valid[:, 1:] = 1.0 - term[:, :-1]
    acts = _t(actions) if actions is not None else torch.zeros(b, h, 1)
    return ChunkBatch(
        observations=torch.arange(b, dtype=torch.float32)[:, None] * 0.5,
        actions=acts,
        rewards=r,
        masks=_t(masks),
        terminals=term,
        valid=valid,
        next_observations=torch.arange(b, dtype=torch.float32)[:, None] - 1.0,
    )


# Three chunks of h = 2: (0) mid-episode, (1) terminates at its last step (valid, mask 0),
# (2) the episode ends (time limit) after step 0, so step 1 is padding: weight 0 in the critic.
BATCH = dict(
    rewards=[[1.0, 1.0], [0.5, 2.0], [4.0, 5.0]],
    masks=[[1, 1], [1, 0], [1, 1]],
    terminals=[[0, 0], [0, 1], [1, 1]],
)


@pytest.mark.parametrize("q_agg, expected", [("mean", 0.6875), ("min", 0.75)])
def test_critic_loss_hand_arithmetic(q_agg: str, expected: float) -> None:
    # Constant critics: online Q = (1, 3), target Q̄ = (2, 4) → agg Q̄ = 3 (mean) or 2 (min).
    # γ = 0.5, h = 2 → γ^h = 0.25. Targets (mean): 1 + 0.25·3 = 1.75; 2 + 0 (mask 0) = 2; row 2
    # is weighted out. loss = [(1−1.75)² + (3−1.75)² + (1−2)² + (3−2)²] / (E·B = 6) = 0.6875.
    # With min: 1 + 0.25·2 = 1.5 → [0.25 + 2.25 + 1 + 1] / 6 = 0.75.
    batch = make_batch(
        rewards=[[0.0, 1.0], [0.0, 2.0], [0.0, 5.0]],
        masks=BATCH["masks"],
        terminals=BATCH["terminals"],
    )
    zeros = np.zeros((2, 3))
    critic = linear_critic(zeros, np.array([1.0, 3.0]))
    target = linear_critic(zeros, np.array([2.0, 4.0]))
    cfg = AgentConfig(horizon=2, discount=0.5, q_agg=q_agg)
    loss, info = critic_loss(critic, target, batch, torch.zeros(3, 2), cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert set(info) >= {"loss", "q_mean", "target_mean"}
    assert all(not v.requires_grad and v.dim() == 0 for v in info.values())


def _np_critic_loss(
    w: np.ndarray,
    b: np.ndarray,
    wt: np.ndarray,
    bt: np.ndarray,
    batch: ChunkBatch,
    next_a: np.ndarray,
    gamma: float,
    agg: str,
    chunking: bool,
) -> float:
    """Independent numpy version of the QC critic loss for linear critics."""
    s, s2 = batch.observations.numpy(), batch.next_observations.numpy()
    acts = batch.actions.numpy()
    a = acts.reshape(len(s), -1) if chunking else acts[:, 0]
    q = np.stack([np.concatenate([s, a], 1) @ w[k] + b[k] for k in range(len(w))])  # (E, B)
    qt = np.stack([np.concatenate([s2, next_a], 1) @ wt[k] + bt[k] for k in range(len(wt))])
    qt = qt.mean(0) if agg == "mean" else qt.min(0)
    h = batch.rewards.shape[1]
    y = batch.rewards.numpy()[:, -1] + gamma**h * batch.masks.numpy()[:, -1] * qt
    return float(np.mean(batch.valid.numpy()[:, -1] * (q - y) ** 2))


@pytest.mark.parametrize("chunking", [True, False])
@pytest.mark.parametrize("q_agg", ["mean", "min"])
def test_critic_loss_matches_numpy(chunking: bool, q_agg: str) -> None:
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, (3, 2, 1))
    batch = make_batch(**BATCH, actions=acts)
    d = 1 + (2 if chunking else 1)
    w, wt = rng.normal(size=(2, d)), rng.normal(size=(2, d))
    b, bt = rng.normal(size=2), rng.normal(size=2)
    next_a = rng.uniform(-1, 1, (3, d - 1))
    cfg = AgentConfig(horizon=2, discount=0.9, q_agg=q_agg, action_chunking=chunking)
    loss, _ = critic_loss(linear_critic(w, b), linear_critic(wt, bt), batch, _t(next_a), cfg)
    expected = _np_critic_loss(w, b, wt, bt, batch, next_a, 0.9, q_agg, chunking)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The backup uses γ^h, not γ: a γ^1 version differs (so this test can fail).
    assert expected != pytest.approx(
        _np_critic_loss(w, b, wt, bt, batch, next_a, 0.9**0.5, q_agg, chunking), rel=1e-3
    )


def test_critic_loss_ignores_padded_chunk_and_target_has_no_grad() -> None:
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(2, 3)), rng.normal(size=2)
    critic, target = linear_critic(w, b), linear_critic(w + 1, b)
    cfg = AgentConfig(horizon=2, discount=0.9)
    batch = make_batch(**BATCH, actions=rng.uniform(-1, 1, (3, 2, 1)))
    loss, _ = critic_loss(critic, target, batch, torch.zeros(3, 2), cfg)
    batch.rewards[2] += 100.0  # row 2 runs past its episode's end: valid[:, -1] = 0
    loss2, _ = critic_loss(critic, target, batch, torch.zeros(3, 2), cfg)
    assert loss.item() == loss2.item()
    loss2.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in critic.parameters())


def test_flow_bc_loss_hand_arithmetic() -> None:
    # v ≡ 0, x0 = 0 → loss = mean over (B, H, A) of valid · x1² = (1 + 4 + 9 + 0) / 4 = 3.5.
    flow = linear_flow(1, 2, np.zeros((2, 4)), np.zeros(2))
    actions = _t([[[1.0], [2.0]], [[3.0], [4.0]]])
    valid = _t([[1, 1], [1, 0]])
    loss, info = flow_bc_loss(
        flow, torch.zeros(2, 1), actions, valid, torch.zeros(2, 2), _t([[0.3], [0.7]])
    )
    assert loss.item() == pytest.approx(3.5)
    assert info["bc_flow_loss"].item() == pytest.approx(3.5)


def test_flow_bc_loss_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    b, h, a, o = 3, 2, 2, 2
    d = h * a
    w, bias = rng.normal(size=(d, o + d + 1)), rng.normal(size=d)
    obs, x1 = rng.normal(size=(b, o)), rng.uniform(-1, 1, (b, h, a))
    x0, t = rng.normal(size=(b, d)), rng.uniform(size=(b, 1))
    valid = np.array([[1, 1], [1, 0], [1, 1]], dtype=np.float64)
    x1f = x1.reshape(b, d)
    xt = (1 - t) * x0 + t * x1f
    v = np.concatenate([obs, xt, t], 1) @ w.T + bias
    expected = np.mean(((v - (x1f - x0)) ** 2).reshape(b, h, a) * valid[..., None])
    flow = linear_flow(o, d, w, bias)
    loss, _ = flow_bc_loss(flow, _t(obs), _t(x1), _t(valid), _t(x0), _t(t))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_distill_loss_hand_arithmetic() -> None:
    # v ≡ c = (0.5, -0.25): Euler from z gives z + c exactly, then clip to [-1, 1].
    flow = linear_flow(1, 2, np.zeros((2, 4)), np.array([0.5, -0.25]))
    z = _t([[0.0, 0.0], [0.8, -0.9]])  # targets: (0.5, -0.25), (1.0 [clipped 1.3], -1.0 [clipped])
    mu = _t([[0.5, 0.75], [0.0, -1.0]]).requires_grad_(True)
    loss, info = distill_loss(mu, flow, torch.zeros(2, 1), z, flow_steps=4, alpha=10.0)
    # squared errors: 0, 1, 1, 0 → mean 0.5 → α · 0.5 = 5
    assert loss.item() == pytest.approx(5.0, rel=1e-6)
    assert info["distill_loss"].item() == pytest.approx(0.5, rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in flow.parameters())  # the target is detached


def test_q_loss_clips_and_moves_only_the_actor() -> None:
    w = np.array([[0.0, 1.0, 2.0], [1.0, 3.0, 0.0]])  # Q_k = w_k · [s, a1, a2] + b_k
    critic = linear_critic(w, np.array([0.5, -0.5]))
    obs = _t([[1.0], [2.0]])
    mu = _t([[0.5, 2.0], [-3.0, 0.25]]).requires_grad_(True)  # clipped: (0.5, 1), (-1, 0.25)
    # Q_1 = (0 + 0.5 + 2 + 0.5, 0 − 1 + 0.5 + 0.5) = (3, 0); Q_2 = (1 + 1.5 − 0.5, 2 − 3 − 0.5) = (2, −1.5)
    # mean over ensemble: (2.5, −0.75) → loss = −mean = −0.875
    loss, info = q_loss(critic, obs, mu)
    assert loss.item() == pytest.approx(-0.875)
    assert info["q"].item() == pytest.approx(0.875)
    loss.backward()
    assert all(p.grad is None for p in critic.parameters())
    # dloss/dmu = −(1/B)·mean_k w_k[a] inside the clip range, 0 where clipped
    expected = -0.5 * np.array([[0.5 * (1 + 3), 0.0], [0.0, 0.5 * (2 + 0)]])
    np.testing.assert_allclose(mu.grad.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("actor_type", ["best_of_n", "fql"])
def test_total_loss_sums_and_prefixes(actor_type: str) -> None:
    torch.manual_seed(0)
    cfg = AgentConfig(actor_type=actor_type, horizon=2, hidden_dims=[8], flow_steps=3)
    batch = make_batch(**BATCH, actions=np.random.default_rng(3).uniform(-1, 1, (3, 2, 1)))
    critic, target = ChunkCritic(1, 2, [8]), ChunkCritic(1, 2, [8])
    flow, actor = FlowActor(1, 2, [8]), OneStepActor(1, 2, [8])
    noise = LossNoise(x0=torch.randn(3, 2), t=torch.rand(3, 1), z=torch.randn(3, 2))
    next_a = torch.rand(3, 2)
    loss, info = total_loss(critic, target, flow, actor, batch, next_a, noise, cfg)
    c, _ = critic_loss(critic, target, batch, next_a, cfg)
    bc, _ = flow_bc_loss(flow, batch.observations, batch.actions, batch.valid, noise.x0, noise.t)
    expected = c + bc
    if actor_type == "fql":
        mu = actor(batch.observations, noise.z)
        expected = expected + distill_loss(mu, flow, batch.observations, noise.z, 3, cfg.alpha)[0]
        expected = expected + q_loss(critic, batch.observations, mu)[0]
        assert {"actor/distill_loss", "actor/q_loss"} <= set(info)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert {"critic/loss", "actor/bc_flow_loss", "actor/loss"} <= set(info)
    assert all(k.startswith(("critic/", "actor/")) or k == "total_loss" for k in info)
