"""Image observations on the learner side (issue 12): uint8 replay rows and frame stacks, random
shifts, which losses train the shared encoder, and training QC and QC-FQL from a real image HDF5
file through ``Learner`` (tiny 32x32 images, tiny nets, a few updates)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from qc_robot.agent.agent import QCAgent
from qc_robot.agent.encoder import random_shift
from qc_robot.agent.losses import critic_loss, total_loss
from qc_robot.cli import compose
from qc_robot.config import AgentConfig, TrainConfig, VisionConfig
from qc_robot.data.hdf5_io import EpisodeWriter, load_flat
from qc_robot.data.replay import ChunkReplay
from qc_robot.train.checkpoint import load_checkpoint
from qc_robot.train.learner import Learner, TrainSetupError

IMG = (32, 32, 3)
TINY = ["agent.hidden_dims=[32,32]", "agent.num_samples=4", "agent.flow_steps=3", "agent.batch_size=8",
        "agent.vision.channels=[4,8]", "agent.vision.out_dim=16", "agent.device=cpu"]


def write_image_dataset(path: Path, lengths: tuple[int, ...] = (12, 9), state_dim: int = 28, seed: int = 0) -> Path:
    """A robomimic-layout file: 'state' float32 and a uint8 32x32 RGB 'image' per step."""
    rng = np.random.default_rng(seed)
    with EpisodeWriter(path, {"task": "cube-single-task1"}) as w:
        for n in lengths:
            imgs = rng.integers(0, 256, (n + 1, *IMG), dtype=np.uint8)
            state = rng.normal(size=(n + 1, state_dim)).astype(np.float32)
            obs = {"state": state[:-1], "image": imgs[:-1]}
            nxt = {"state": state[1:], "image": imgs[1:]}
            w.add_episode(obs, rng.uniform(-1, 1, (n, 5)), -np.ones(n), np.zeros(n), nxt)
    return path


def test_random_shift_moves_each_image_by_at_most_pad_with_edges_replicated() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (16, 10, 12, 3), dtype=torch.uint8, generator=gen)
    out = random_shift(img, 2, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == img.shape
    h, w = img.shape[1:3]
    moved = 0
    for b in range(len(img)):
        found = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                rows = np.clip(np.arange(h) + dy, 0, h - 1)
                cols = np.clip(np.arange(w) + dx, 0, w - 1)
                if torch.equal(out[b], img[b][rows][:, cols]):
                    found.append((dy, dx))
        assert found, f"image {b} is not a shift of at most 2 pixels of its input"
        moved += found != [(0, 0)]
    assert moved >= 8  # shifts are drawn per image, not one for the batch
    assert torch.equal(random_shift(img, 0), img)


def _rows(n: int, ends: set[int]) -> dict[str, np.ndarray]:
    """Rows whose image pixels hold the row number (next image: row + 100)."""
    img = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()
    return {"observations": np.zeros((n, 2), np.float32), "actions": np.zeros((n, 1), np.float32),
            "rewards": np.zeros(n, np.float32), "terminals": np.array([i in ends for i in range(n)], np.float32),
            "masks": np.ones(n, np.float32), "next_observations": np.zeros((n, 2), np.float32),
            "images/cam": img, "next_images/cam": img + 100}


def test_replay_keeps_images_as_uint8_and_stacks_frames_within_an_episode() -> None:
    rp = ChunkReplay(2, 1, 20, image_shapes={"cam": (4, 4, 3)}, frame_stack=3)
    rp.add_offline(_rows(10, {3, 9}))  # episodes: rows 0-3, 4-9
    assert rp.numpy()["images/cam"].dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        bad = _rows(2, set())
        bad["images/cam"] = bad["images/cam"].astype(np.float32)
        rp.extend(bad)
    b = rp.gather(torch.tensor([0, 1, 4, 6]), 2, 0.99)
    assert b.images is not None and b.next_images is not None
    # frames (oldest first) along channels: pixel values name the rows they came from
    frames = b.images[0][:, 0, 0, ::3].numpy()  # (B, 3)
    assert frames.tolist() == [[0, 0, 0], [0, 0, 1], [4, 4, 4], [4, 5, 6]]
    # s' of a 2-step chunk from row r is next_obs[r + 1], after the frames of rows r, r + 1
    nxt = b.next_images[0][:, 0, 0, ::3].numpy()
    assert nxt.tolist() == [[0, 1, 101], [1, 2, 102], [4, 5, 105], [6, 7, 107]]
    assert b.images[0].shape == (4, 4, 4, 9) and b.images[0].dtype == torch.uint8


def _agent(actor_type: str, grad: str) -> tuple[QCAgent, ChunkReplay]:
    cfg = AgentConfig(actor_type=actor_type, hidden_dims=[16, 16], num_samples=4, flow_steps=2, batch_size=6,
                      device="cpu", fast_sampling=False,
                      vision=VisionConfig(channels=[4], out_dim=8, encoder_grad=grad, aug_pad=1))
    agent = QCAgent(cfg, 3, 2, seed=0, image_shapes={"cam": (8, 8, 3)})
    rng = np.random.default_rng(0)
    n = 30
    rp = ChunkReplay(3, 2, n, image_shapes={"cam": (8, 8, 3)})
    rp.add_offline({"observations": rng.normal(size=(n, 3)).astype(np.float32),
                    "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                    "rewards": rng.normal(size=n).astype(np.float32),
                    "terminals": (np.arange(n) % 10 == 9).astype(np.float32), "masks": np.ones(n, np.float32),
                    "next_observations": rng.normal(size=(n, 3)).astype(np.float32),
                    "images/cam": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                    "next_images/cam": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)})
    return agent, rp


@pytest.mark.parametrize("actor_type", ["best_of_n", "fql"])
def test_the_shared_encoder_learns_from_the_critic_loss_only_by_default(actor_type: str) -> None:
    """encoder_grad='critic' (DrQ): the encoder's gradient from the total loss is the critic
    loss's own; with 'all' the actor losses add to it."""
    grads = {}
    for grad in ("critic", "all"):
        agent, rp = _agent(actor_type, grad)
        batch = rp.sample(6, 5, 0.99, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        enc, actor_obs, next_obs = agent._encode(batch, gen)
        noise_shape = agent.noise_shape(6)
        with torch.no_grad():
            next_actions = agent._target_actions(next_obs, torch.randn(noise_shape, generator=gen))
        from qc_robot.agent.losses import LossNoise

        noise = LossNoise(torch.randn(6, agent.chunk_dim, generator=gen), torch.rand(6, 1, generator=gen),
                          torch.randn(6, agent.chunk_dim, generator=gen) if actor_type == "fql" else None)
        assert agent.encoder is not None
        params = list(agent.encoder.parameters())
        loss, _ = total_loss(agent.critic, agent.target_critic, agent.flow, agent.one_step_actor, enc,
                             next_actions, noise, agent.cfg, actor_observations=actor_obs)
        g_total = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        c_loss, _ = critic_loss(agent.critic, agent.target_critic, enc, next_actions, agent.cfg)
        g_critic = torch.autograd.grad(c_loss, params, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in g_critic)
        grads[grad] = max(float((a - b).abs().max()) for a, b in zip(g_total, g_critic, strict=True))
    assert grads["critic"] == 0.0
    assert grads["all"] > 0.0


@pytest.mark.parametrize("actor_type", ["best_of_n", "fql"])
def test_an_update_moves_encoder_and_target_encoder(actor_type: str) -> None:
    agent, rp = _agent(actor_type, "critic")
    assert agent.encoder is not None and agent.target_encoder is not None
    before = [p.detach().clone() for p in agent.encoder.parameters()]
    target_before = [p.detach().clone() for p in agent.target_encoder.parameters()]
    info = agent.update(rp.sample(6, 5, 0.99, generator=torch.Generator().manual_seed(0)))
    assert all(torch.isfinite(v) for v in info.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.encoder.parameters(), strict=True))
    moved = [float((a - b).abs().max()) for a, b in zip(target_before, agent.target_encoder.parameters(),
                                                         strict=True)]
    assert max(moved) > 0  # Polyak step toward the online encoder
    with pytest.raises(ValueError, match="needs images"):
        agent.act(np.zeros((1, 3), np.float32))


def _cfg(data: Path, run: Path, *extra: str) -> TrainConfig:
    cfg = compose("train", ["experiment=smoke", f"data.path={data}", f"training.run_dir={run}",
                            "training.eval_episodes=0", "training.online_steps=0", "training.progress=false",
                            "training.log_interval=0", *TINY, *extra])
    assert isinstance(cfg, TrainConfig)
    return cfg


@pytest.mark.parametrize("agent", ["qc", "qc_fql"])
def test_train_a_few_steps_from_an_image_hdf5_and_reload_the_checkpoint(tmp_path: Path, agent: str) -> None:
    data = write_image_dataset(tmp_path / "img.hdf5")
    with h5py.File(data) as f:  # frames chunked one per chunk, compressed
        ds = f["data/demo_0/obs/image"]
        assert ds.dtype == np.uint8 and ds.chunks == (1, *IMG) and ds.compression == "gzip"
    flat = load_flat(data, obs_keys=["state", "image"])
    assert flat.observations.shape == (21, 28) and flat.images["image"].shape == (21, *IMG)
    assert flat.images["image"].dtype == np.uint8

    cfg = _cfg(data, tmp_path / "run", f"agent={agent}", "training.offline_steps=3",
               "data.obs_keys=[state,image]")
    result = Learner(cfg).run()
    assert result.step == 3
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt", device="cpu")
    assert ckpt.agent.image_shapes == {"image": IMG} and ckpt.agent.obs_dim == 28
    assert [(f.key, f.shape, f.dtype) for f in ckpt.obs_fields] == [("state", (28,), "float32"),
                                                                      ("image", IMG, "uint8")]
    # the reloaded agent acts exactly like the trained one
    lr = Learner(_cfg(data, tmp_path / "run", f"agent={agent}", "training.offline_steps=3",
                      "data.obs_keys=[state,image]", "training.resume=true"))
    obs, img = flat.observations[:2], flat.images["image"][:2]
    a = ckpt.agent.act(obs, torch.Generator().manual_seed(5), images=[img])
    b = lr.agent.act(obs, torch.Generator().manual_seed(5), images=[img])
    assert np.array_equal(a, b) and a.shape == (2, 5, 5)


def test_frame_stacking_and_what_the_in_process_sim_refuses(tmp_path: Path) -> None:
    data = write_image_dataset(tmp_path / "img.hdf5")
    lr = Learner(_cfg(data, tmp_path / "a", "training.offline_steps=1", "data.obs_keys=[state,image]",
                      "agent.vision.frame_stack=2"))
    assert lr.agent.image_shapes == {"image": (32, 32, 6)} and lr.replay.image_shapes == {"image": IMG}
    lr.run()
    # what the learner's sim cannot do with images is refused up front, not after training:
    # online steps (it records no frames yet) and evaluating stacked frames (it renders one)
    with pytest.raises(TrainSetupError, match="records no camera images"):
        Learner(_cfg(data, tmp_path / "b", "training.offline_steps=1", "data.obs_keys=[state,image]",
                     "training.online_steps=5"))
    with pytest.raises(TrainSetupError, match="without frame stacks"):
        Learner(_cfg(data, tmp_path / "c", "training.offline_steps=1", "data.obs_keys=[state,image]",
                     "agent.vision.frame_stack=2", "training.eval_episodes=1"))
