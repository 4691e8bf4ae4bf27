"""Real-time chunking: the guided sampler, the exported graph, the server's continuation and the
executor modes (frozen prefix executed exactly, smoother seams than latency_aware)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_fixtures import HIGH, LOW, OBS_DIM, Variant, make_acting, make_meta, make_smooth_acting

from qc_robot import protocol as P
from qc_robot.agent import rtc
from qc_robot.agent.acting import euler_sample
from qc_robot.agent.networks import FlowActor, aggregate_q
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.executor import MODES, ChunkExecutor
from qc_robot.drivers.simclock import DelayedPolicySource, seam_jerk
from qc_robot.export.graph import ExportGraph
from qc_robot.export.onnx_export import export_policy
from qc_robot.policies.base import ChunkGuide
from qc_robot.policies.onnx_policy import OnnxPolicy

H = 8
OBS = {"joint_pos": np.zeros(4), "target": np.zeros(2)}


# -- the sampler in torch --------------------------------------------------------------------------


@pytest.mark.parametrize(("layer_norm", "time_dims"), [(False, 0), (True, 8)])
def test_hand_written_vjp_matches_autograd(layer_norm: bool, time_dims: int) -> None:
    torch.manual_seed(0)
    flow = FlowActor(OBS_DIM, 12, [32, 32], layer_norm=layer_norm, time_dims=time_dims)
    obs, x, e = torch.randn(5, OBS_DIM), torch.randn(5, 12), torch.randn(5, 12)
    h = rtc.hoist_first_layer(flow, 4)
    xr = x.clone().requires_grad_(True)
    v = flow(obs, xr, torch.full((5, 1), 0.25))
    (want,) = torch.autograd.grad((v * e).sum(), xr)
    pre = flow.normalizer(obs) @ h.w_obs + h.step_bias[1] + x @ h.w_x  # t_1 = 1/4
    out, inputs = rtc._forward_cached(h.rest, pre)
    got = rtc._backward(h.rest, inputs, e) @ h.w_x.t()
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_overlap_guided_sampling_is_plain_sampling() -> None:
    torch.manual_seed(1)
    flow = FlowActor(OBS_DIM, 12, [32, 32])
    obs, noise = torch.randn(4, OBS_DIM), torch.randn(4, 12)
    zeros = torch.zeros(4, 12)
    torch.testing.assert_close(rtc.guided_euler_sample(flow, obs, noise, 5, torch.randn(4, 12), zeros),
                               euler_sample(flow, obs, noise, 5), atol=1e-6, rtol=0)


def test_soft_mask_is_one_on_the_prefix_decays_over_the_overlap_and_is_zero_beyond() -> None:
    w = rtc.soft_mask(H, torch.tensor([2, 0, 9]), torch.tensor([6, 8, 3]))
    assert torch.equal(w[0, :2], torch.ones(2)) and torch.equal(w[0, 6:], torch.zeros(2))
    c = 4.0 / 5.0  # step 2 of (d=2, L=6): c = (L - i)/(L - d + 1)
    assert math.isclose(float(w[0, 2]), c * (math.exp(c) - 1) / (math.e - 1), rel_tol=1e-6)
    assert bool(torch.all(w[0, 2:6] < 1)) and bool(torch.all(w[0, 2:6].diff() < 0))
    assert bool(torch.all(w[1] > 0)) and float(w[1, 0]) < 1  # nothing frozen, all overlap
    assert torch.equal(w[2], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0]))  # d clamped to L
    assert torch.equal(rtc.prefix_mask(H, torch.tensor([2]), torch.tensor([6]))[0],
                       torch.tensor([True, True] + [False] * 6))


def test_guidance_pulls_the_overlap_toward_the_previous_chunk() -> None:
    torch.manual_seed(2)
    flow = FlowActor(OBS_DIM, 12, [32, 32])
    obs, noise = torch.randn(64, OBS_DIM), torch.randn(64, 12)
    target = torch.rand(64, 12) * 1.6 - 0.8
    weights = rtc.per_element(rtc.soft_mask(4, torch.full((64,), 1), torch.full((64,), 3)), 3)
    with torch.no_grad():
        free = euler_sample(flow, obs, noise, 10)
        guided = rtc.guided_euler_sample(flow, obs, noise, 10, target, weights)

    def err(x: torch.Tensor) -> float:
        return float((weights * (x - target) ** 2).sum())

    with torch.no_grad():
        assert err(guided) < 0.5 * err(free)


def test_rtc_best_of_n_ranks_the_whole_chunk_with_its_frozen_prefix() -> None:
    acting = make_acting(Variant("best_of_n", 4))
    torch.manual_seed(3)
    obs, noise = torch.randn(3, OBS_DIM), torch.randn(3, 4, 12)
    prev = torch.rand(3, 4, 3) * 2 - 1
    delay, overlap = torch.tensor([2, 1, 0]), torch.tensor([3, 4, 2])
    with torch.no_grad():
        got = rtc.rtc_act(acting, obs, noise, prev, delay, overlap)  # (B, H, A)
        for b in range(3):
            k = int(min(delay[b], overlap[b]))
            assert torch.equal(got[b, :k], prev[b, :k])
            # every candidate on its own (best-of-1 is that candidate), then Q on the whole chunk
            cands = torch.cat([rtc.rtc_act(acting, obs[b : b + 1], noise[b, i].reshape(1, 1, -1), prev[b : b + 1],
                                           delay[b : b + 1], overlap[b : b + 1]) for i in range(4)])  # (N, H, A)
            assert acting.critic is not None
            q = aggregate_q(acting.critic(obs[b].expand(4, -1), cands.reshape(4, -1)), "mean")
            torch.testing.assert_close(got[b], cands[int(q.argmax())])


# -- the exported graph ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smooth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The scripted smooth-but-multimodal policies (see ``make_smooth_acting``), exported."""
    out = {}
    for actor_type in ("best_of_n", "fql"):
        acting = make_smooth_acting(actor_type, H)
        out[actor_type] = export_policy(acting, make_meta(acting),
                                        tmp_path_factory.mktemp("rtc") / f"{actor_type}.onnx")
    return out


def test_exported_continuation_matches_torch(smooth: dict[str, Path]) -> None:
    acting = make_smooth_acting("best_of_n", H)
    policy = OnnxPolicy(smooth["best_of_n"], warmup=0)
    ref = ExportGraph(acting, LOW, HIGH, lean=False).eval()
    rng = np.random.default_rng(4)
    prev = (LOW + (HIGH - LOW) * rng.random((1, H, 3))).astype(np.float32)
    noise = rng.normal(size=(1, *policy.meta.noise_shape)).astype(np.float32)
    obs = rng.normal(size=(1, OBS_DIM)).astype(np.float32)
    feed = {"observation": obs, "noise": noise, **policy.guide_feed(ChunkGuide(prev[0], 3, 6))}
    got = policy.session.run(["actions"], feed)[0]
    with torch.no_grad():
        want = ref.continued(torch.from_numpy(obs), torch.from_numpy(noise), torch.from_numpy(prev),
                             torch.tensor([3]), torch.tensor([6])).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got[0, :3], prev[0, :3])


# -- the server continues the last chunk it sent ------------------------------------------------------


def _client(server) -> PolicyClient:  # type: ignore[no-untyped-def]
    spec = server.spec
    hello = P.Hello("test", P.obs_spec_to_wire(spec.obs_fields), spec.action_dim, spec.action_low,
                    spec.action_high, spec.control_hz)
    client = PolicyClient(server.address, hello)
    client.connect(5.0)
    return client


def _ask(client: PolicyClient, step: int, **guide: int) -> P.Chunk:
    client.request({"joint_pos": np.zeros(4, np.float32), "target": np.zeros(2, np.float32)}, 0, step,
                   reset=step == 0, **guide)
    reply = client.poll(5.0)
    assert isinstance(reply, P.Chunk), reply
    return reply


def test_server_freezes_the_prefix_of_the_chunk_it_sent(smooth: dict[str, Path]) -> None:
    from qc_robot.server.app import ControlServer

    with ControlServer(OnnxPolicy(smooth["fql"], warmup=0), "tcp://127.0.0.1:*") as server:
        client = _client(server)
        try:
            first = _ask(client, 0)
            cont = _ask(client, 3, prev_start_step=0, delay_steps=2)
            assert cont.frozen == 2 and first.frozen == 0
            np.testing.assert_array_equal(cont.actions[:2], first.actions[3:5])
            # a driver that names another chunk than the last one sent gets a plain chunk
            assert _ask(client, 5, prev_start_step=1, delay_steps=2).frozen == 0
        finally:
            client.close()


@pytest.mark.parametrize("name", ["best_of_n", "fql"])
def test_old_onnx_file_still_serves_rtc_requests(name: str) -> None:
    from qc_robot.server.app import ControlServer

    path = Path(__file__).parent / "fixtures" / f"legacy_v1_{name}.onnx"
    with ControlServer(OnnxPolicy(path, warmup=0), "tcp://127.0.0.1:*") as server:
        client = _client(server)
        try:
            first = _ask(client, 0)
            cont = _ask(client, 2, prev_start_step=0, delay_steps=1)  # asks for RTC, gets a plain chunk
            assert cont.frozen == 0 and cont.actions.shape == first.actions.shape == (4, 3)
            assert np.all(cont.actions >= LOW) and np.all(cont.actions <= HIGH)
        finally:
            client.close()


# -- executor modes on a simulated clock ------------------------------------------------------------


def _run(policy: OnnxPolicy, mode: str, delay: int, steps: int = 160, **kw: object):  # type: ignore[no-untyped-def]
    clock = [0]
    src = DelayedPolicySource(policy, delay, lambda: clock[0])
    ex = ChunkExecutor(src, H, mode, **kw)  # type: ignore[arg-type]
    executed: list[np.ndarray | None] = []
    seqs = []
    for t in range(steps):
        clock[0] = t
        a = ex.act(OBS, t, 0)
        executed.append(a)
        seqs.append(ex.last_seq if a is not None else -1)
    return src, ex, executed, seqs


@pytest.mark.parametrize("delays", [[2], [3, 1, 1]])  # steady, or replies sooner than the estimate
def test_rtc_executes_the_frozen_prefix_exactly(smooth: dict[str, Path], delays: list[int]) -> None:
    """Every action of a frozen prefix runs bit-for-bit as the previous chunk planned it, and the
    new chunk (the one the critic scored) holds the same numbers. With a jittery delay the
    estimate (max of recent delays) exceeds some delays: then part of the prefix runs from the
    new chunk itself, and must still be the old plan."""
    src, ex, executed, seqs = _run(OnnxPolicy(smooth["best_of_n"], warmup=0), "rtc", delays)
    assert ex.stats.chunks > 10
    from_new = 0
    for k in range(1, len(src.chunks)):
        old, new = src.chunks[k - 1], src.chunks[k]
        shift = new.start_step - old.start_step
        assert 0 < shift < H and new.frozen >= 1
        for i in range(new.frozen):
            t = new.start_step + i
            a = executed[t]
            assert a is not None
            np.testing.assert_array_equal(a, old.actions[shift + i])
            np.testing.assert_array_equal(new.actions[i], old.actions[shift + i])
            from_new += seqs[t] == k
    assert from_new > 0 or len(delays) == 1  # the jittery case did run prefixes of new chunks


@pytest.mark.parametrize("actor_type", ["best_of_n", "fql"])
def test_rtc_seams_are_smoother_than_latency_aware(smooth: dict[str, Path], actor_type: str) -> None:
    """Scripted case: every sample is a constant chunk at a random level, so a new chunk that
    replaces the old one jumps; RTC continues the old level across the seam."""
    policy = OnnxPolicy(smooth[actor_type], warmup=0)
    jerk = {}
    for mode in ("latency_aware", "rtc"):
        # The graph draws its own (unseeded) noise: 480 steps keep the ratio's spread small.
        _, ex, executed, seqs = _run(policy, mode, 2, steps=480)
        assert ex.stats.empty <= 2  # both ask early: no holds after the first reply
        jerk[mode], seams = seam_jerk([a if a is not None else np.zeros(3) for a in executed], seqs)
        assert seams > 45
    # fql blends (ratio ~0.45), best-of-N guides (~0.15): both clearly below latency_aware.
    assert jerk["rtc"] < 0.7 * jerk["latency_aware"], jerk


class _LevelSource:
    """Answers at once; chunk k plans the value k for every step (its age is readable)."""

    def __init__(self) -> None:
        self.k = -1
        self._pending: P.Chunk | None = None

    def request(self, obs, episode_id: int, step: int, reset: bool = False, **guide: int) -> int:  # type: ignore[no-untyped-def]
        self.k += 1
        self._pending = P.Chunk(self.k + 1, episode_id, step, np.full((4, 1), float(self.k), np.float32),
                                "v", 0.0, 0.0, 0.0)
        return self.k + 1

    def poll(self, timeout_s: float = 0.0) -> P.Chunk | None:
        reply, self._pending = self._pending, None
        return reply

    def cancel(self, timed_out: bool = False) -> None:
        self._pending = None


def test_temporal_ensemble_averages_every_prediction_with_act_weights() -> None:
    m = 0.5
    ex = ChunkExecutor(_LevelSource(), 4, "temporal_ensemble", ensemble_m=m)
    got = [ex.act({}, t, 0) for t in range(12)]
    assert got[0] is None and all(a is not None for a in got[1:])  # a reply lands one tick later
    # steady state: chunk k is requested at step k and taken in at k + 1 (its action for k is
    # stale), so step t blends chunks t-3, t-2, t-1
    for t in range(4, 12):
        levels = np.arange(t - 3, t, dtype=np.float64)  # oldest first
        w = np.exp(-m * np.arange(3))
        a = got[t]
        assert a is not None
        assert math.isclose(float(a[0]), float((w * levels).sum() / w.sum()), rel_tol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_behind_one_api(smooth: dict[str, Path], mode: str) -> None:
    """Same constructor, same calls; every mode returns only actions within the policy's limits;
    the modes that ask early never hold after start-up, open_loop holds while each reply is due."""
    _, ex, executed, _ = _run(OnnxPolicy(smooth["fql"], warmup=0), mode, 2, steps=80)
    done = [a for a in executed if a is not None]
    assert all(np.all(a >= LOW) and np.all(a <= HIGH) for a in done)
    held = sum(a is None for a in executed[3:])
    if mode == "open_loop":
        assert held >= 2 * (ex.stats.chunks - 1)
    else:
        assert held == 0
    assert ex.stats.executed == len(done) > 40
