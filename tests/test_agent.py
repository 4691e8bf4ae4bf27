"""QCAgent: shapes per variant, the update step, Polyak, exact resume, bf16 sampling, overfit."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from qc_robot.agent.agent import QCAgent
from qc_robot.config import AgentConfig
from qc_robot.data.batch import ChunkBatch

OBS, A = 6, 2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny nets gain nothing from threads, and on a shared CPU an oversubscribed OpenMP pool
    turns each of the overfit test's 300 updates into a wait on a descheduled thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**kw: object) -> AgentConfig:
    base: dict[str, object] = dict(
        hidden_dims=[32, 32], batch_size=16, num_samples=4, flow_steps=3, horizon=3
    )
    base.update(kw)
    return AgentConfig(**base)  # type: ignore[arg-type]


def random_batch(b: int, h: int, seed: int = 0) -> ChunkBatch:
    g = torch.Generator().manual_seed(seed)
    terminals = (torch.rand(b, h, generator=g) < 0.2).float().cummax(dim=1).values
    valid = torch.ones(b, h)
    valid[:, 1:] = 1 - terminals[:, :-1]
    return ChunkBatch(
        observations=torch.randn(b, OBS, generator=g),
        actions=torch.rand(b, h, A, generator=g) * 2 - 1,
        rewards=torch.randn(b, h, generator=g).cumsum(1),
        masks=1 - terminals,
        terminals=terminals,
        valid=valid,
        next_observations=torch.randn(b, OBS, generator=g),
    )


VARIANTS = [
    ("best_of_n", True, 3),
    ("fql", True, 3),
    ("best_of_n", False, 3),  # n-step baseline
    ("fql", False, 3),
    ("best_of_n", True, 1),  # plain 1-step
]


@pytest.mark.parametrize("actor_type, chunking, horizon", VARIANTS)
def test_shapes_and_update(actor_type: str, chunking: bool, horizon: int) -> None:
    agent = QCAgent(
        small_cfg(actor_type=actor_type, action_chunking=chunking, horizon=horizon), OBS, A, seed=0
    )
    ph = horizon if chunking else 1
    assert agent.policy_horizon == ph
    assert (agent.one_step_actor is not None) == (actor_type == "fql")
    chunk = agent.act(np.random.default_rng(0).normal(size=(4, OBS)))
    assert chunk.shape == (4, ph, A) and chunk.dtype == np.float32
    assert np.all(np.abs(chunk) <= 1.0)
    before = {k: v.clone() for k, v in agent.state_dict().items() if isinstance(v, torch.Tensor)}
    info = agent.update(random_batch(16, horizon))
    assert all(
        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in info.values()
    )
    assert all(torch.isfinite(v) for v in info.values())
    assert {"critic/loss", "actor/bc_flow_loss", "total_loss"} <= set(info)
    after = agent.state_dict()
    for prefix in ("critic.", "flow.", "target_critic.") + (
        ("one_step_actor.",) if actor_type == "fql" else ()
    ):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), (
            prefix
        )


def test_target_critic_moves_by_tau() -> None:
    agent = QCAgent(small_cfg(tau=0.1), OBS, A, seed=0)
    old_target = [p.clone() for p in agent.target_critic.parameters()]
    agent.update(random_batch(16, 3))
    for old, new, online in zip(
        old_target, agent.target_critic.parameters(), agent.critic.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    assert all(not p.requires_grad for p in agent.target_critic.parameters())


def test_set_normalizer_reaches_every_network() -> None:
    agent = QCAgent(small_cfg(actor_type="fql", sample_dtype="bfloat16"), OBS, A, seed=0)
    agent.set_normalizer(np.full(OBS, 2.0), np.full(OBS, 3.0))
    for net in (agent.critic, agent.target_critic, agent.flow, agent.one_step_actor):
        assert torch.equal(net.normalizer.mean, torch.full((OBS,), 2.0))
    agent.update(random_batch(16, 3))  # the bf16 sampling copies pick the stats up on refresh
    assert torch.equal(agent._sampling["flow"].normalizer.std, torch.full((OBS,), 3.0))


def _train(agent: QCAgent, steps: range) -> None:
    for i in steps:
        agent.update(random_batch(16, 3, seed=i))


@pytest.mark.parametrize(
    "actor_type, sample_dtype", [("best_of_n", "float32"), ("fql", "bfloat16")]
)
def test_resume_is_bit_exact(actor_type: str, sample_dtype: str) -> None:
    cfg = small_cfg(actor_type=actor_type, sample_dtype=sample_dtype)
    straight = QCAgent(cfg, OBS, A, seed=3)
    _train(straight, range(4))

    first = QCAgent(cfg, OBS, A, seed=3)
    _train(first, range(2))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = QCAgent(cfg, OBS, A, seed=99)  # different init and RNG: all must come from the file
    resumed.load_state_dict(torch.load(buf))
    _train(resumed, range(2, 4))

    a, b = straight.state_dict(), resumed.state_dict()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    assert torch.equal(straight.train_generator.get_state(), resumed.train_generator.get_state())
    assert resumed.num_updates == 4
    obs = np.zeros((2, OBS), np.float32)
    np.testing.assert_array_equal(straight.act(obs), resumed.act(obs))


def test_load_does_not_alias_the_source_agent() -> None:
    src = QCAgent(small_cfg(), OBS, A, seed=0)
    _train(src, range(1))
    dst = QCAgent(small_cfg(), OBS, A, seed=1)
    dst.load_state_dict(src.state_dict())
    moments = [s["exp_avg"].clone() for s in src.optimizer.state.values()]
    _train(dst, range(1, 3))
    for m, s in zip(moments, src.optimizer.state.values(), strict=True):
        assert torch.equal(m, s["exp_avg"])


@pytest.mark.parametrize("actor_type", ["best_of_n", "fql"])
def test_bf16_sampling_target_is_close_to_fp32(actor_type: str) -> None:
    ref = QCAgent(
        small_cfg(actor_type=actor_type, hidden_dims=[64, 64], num_samples=8), OBS, A, seed=0
    )
    lp = QCAgent(
        small_cfg(
            actor_type=actor_type, hidden_dims=[64, 64], num_samples=8, sample_dtype="bfloat16"
        ),
        OBS,
        A,
        seed=0,
    )
    for agent in (ref, lp):
        for lpc in agent._lp:
            lpc.refresh()
    obs = torch.randn(64, OBS)
    noise = torch.randn(ref.noise_shape(64))
    with torch.no_grad():
        a32, a16 = ref._target_actions(obs, noise), lp._target_actions(obs, noise)
        q32 = ref.target_critic(obs, a32).mean(0)
        q16 = ref.target_critic(obs, a16).mean(0)
        if actor_type == "fql":  # the distillation target
            from qc_robot.agent.acting import euler_sample

            d32 = euler_sample(ref.flow, obs, noise, 3)
            if lp._fast_flow is not None:  # the agent's fused bf16 sampler
                lp._fast_flow.refresh()
                assert lp._fast_flow.dtype == torch.bfloat16
                d16 = lp._fast_flow.sample(obs, noise, 3)
            else:
                d16 = euler_sample(lp._sampling["flow"], obs, noise, 3)
            assert (d32 - d16).abs().max() > 0  # bf16 did run
            assert (d32 - d16).abs().max() < 0.05
    assert (q32 - q16).abs().mean() < 0.02 * q32.abs().mean() + 1e-3


def test_critic_regresses_constant_returns() -> None:
    """Overfit sanity: with masks = 0 the target is the chunk return, R = 1 + 0.9 = 1.9."""
    torch.manual_seed(0)
    agent = QCAgent(small_cfg(horizon=2, discount=0.9, lr=3e-3), OBS, A, seed=0)
    b = 32
    ones = torch.ones(b, 2)
    batch = ChunkBatch(
        observations=torch.randn(b, OBS),
        actions=torch.rand(b, 2, A) * 2 - 1,
        rewards=torch.tensor([1.0, 1.9]).expand(b, 2).clone(),
        masks=torch.zeros(b, 2),
        terminals=torch.tensor([0.0, 1.0]).expand(b, 2).clone(),
        valid=ones,
        next_observations=torch.randn(b, OBS),
    )
    for _ in range(300):
        info = agent.update(batch)
    assert info["critic/q_mean"].item() == pytest.approx(1.9, abs=0.05)
    assert info["critic/loss"].item() < 1e-2


@pytest.mark.parametrize("actor_type", ["best_of_n", "fql"])
def test_fast_sampling_computes_what_the_modules_compute(actor_type: str) -> None:
    """The fused sampler is a faster route to the same numbers: fp32 vs the module path."""
    cfgs = [small_cfg(actor_type=actor_type, hidden_dims=[64, 64], num_samples=8, sample_dtype="float32",
                      fast_sampling=fast) for fast in (True, False)]
    fast, slow = (QCAgent(c, OBS, A, seed=0) for c in cfgs)
    assert fast._fast_flow is not None and slow._fast_flow is None
    obs = torch.randn(64, OBS)
    noise = torch.randn(fast.noise_shape(64))
    with torch.no_grad():
        torch.testing.assert_close(fast._target_actions(obs, noise), slow._target_actions(obs, noise),
                                   atol=1e-5, rtol=1e-5)
        fast._fast_flow.refresh()
        from qc_robot.agent.acting import euler_sample

        z = torch.randn(64, fast.chunk_dim)
        torch.testing.assert_close(fast._fast_flow.sample(obs, z, 3), euler_sample(slow.flow, obs, z, 3),
                                   atol=1e-5, rtol=1e-5)
    for i in range(3):  # and the updates agree (the copies follow the live weights)
        fi, si = fast.update(random_batch(16, 3, seed=i)), slow.update(random_batch(16, 3, seed=i))
    for k in fi:
        torch.testing.assert_close(fi[k], si[k], atol=1e-4, rtol=1e-4)
