"""Tiny images through every stage (issue 12, "Shown by"): record in sim with the camera
(datagen on visual-cube-single, 32x32) -> train a few updates from the HDF5 file -> export ->
serve -> drive the rendering sim driver, which sends state + uint8 frames and executes the chunks.
Real MuJoCo and EGL rendering, real HDF5, real onnxruntime, real ZeroMQ; everything tiny.

Behind ``slow``: the stages themselves are in the default suite (tests/test_image_agent.py trains
from an image HDF5 file, tests/test_image_export.py exports and serves over a live socket,
tests/test_camera_sim.py records), but rendering and one more trace put this one over 20 s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ogbench")

TASK = "visual-cube-single-task1"
SIDE = 32
TINY = ["agent.hidden_dims=[32,32]", "agent.flow_steps=3", "agent.batch_size=8", "agent.vision.channels=[4,8]",
        "agent.vision.out_dim=16", "agent.device=cpu"]


pytestmark = pytest.mark.usefixtures("offscreen_gl")  # every test here renders: skipped without GL


@pytest.mark.slow  # ~8 s idle (14 s under load): OGBench env build + renders; the default suite has the parts
def test_in_process_evaluation_renders_the_camera_for_an_image_agent(tmp_path: Path) -> None:
    """``train``'s evaluation of an image agent: the sim renders the task camera at the agent's
    size once per chunk and the agent acts on it (eval_image_size reads the size off the agent)."""
    import torch

    from qc_robot.agent.agent import QCAgent
    from qc_robot.config import AgentConfig, VisionConfig
    from qc_robot.train.evaluate import agent_policy, eval_image_size, evaluate

    agent = QCAgent(AgentConfig(actor_type="fql", hidden_dims=[16], device="cpu",
                                vision=VisionConfig(channels=[4], out_dim=8)), 28, 5, seed=0,
                    image_shapes={"image": (SIDE, SIDE, 3)})
    assert eval_image_size(agent) == SIDE
    seen: list[tuple[int, ...]] = []
    act = agent_policy(agent, seed=0)

    def policy(obs: np.ndarray, img: np.ndarray) -> np.ndarray:
        seen.append(img.shape)
        assert img.dtype == np.uint8 and img.std() > 0
        return act(obs, img)  # type: ignore[call-arg]

    r = evaluate(policy, TASK, 1, seed=0, max_episode_steps=10, image_size=SIDE, render_fast=True)
    assert r.episodes == 1 and r.mean_length == 10 and r.policy_queries == 2
    assert seen == [(SIDE, SIDE, 3)] * 2
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="one square RGB camera"):
        eval_image_size(QCAgent(AgentConfig(hidden_dims=[16], device="cpu",
                                            vision=VisionConfig(channels=[4], out_dim=8)), 28, 5,
                                image_shapes={"a": (SIDE, SIDE, 3), "b": (SIDE, SIDE, 3)}))


@pytest.mark.slow  # ~30 s idle (60 s under load): 22 rendered frames and a QC-FQL trace with its RTC branch
def test_record_train_export_serve_drive_with_camera_images(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from qc_robot.cli import compose
    from qc_robot.data.hdf5_io import load_flat
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import run_drive
    from qc_robot.export.onnx_export import run_export
    from qc_robot.policies.onnx_policy import OnnxPolicy
    from qc_robot.server.app import ControlServer
    from qc_robot.sim.datagen import generate
    from qc_robot.train.checkpoint import load_checkpoint
    from qc_robot.train.learner import CHECKPOINT, train

    data = tmp_path / "visual.hdf5"
    generate(TASK, num_episodes=1, episode_length=12, noise=0.1, seed=0, out_path=str(data), progress=False,
             image_size=SIDE, render_fast=True)
    flat = load_flat(data, obs_keys=["state", "image"])
    assert flat.images["image"].shape == (12, SIDE, SIDE, 3) and flat.images["image"].dtype == np.uint8
    assert flat.images["image"].std() > 0  # a rendered scene, not a blank frame

    run = tmp_path / "run"
    train(compose("train", ["experiment=smoke", "agent=qc_fql", f"env.name={TASK}", f"data.path={data}",
                            "data.obs_keys=[state,image]", f"training.run_dir={run}", "training.offline_steps=3",
                            "training.online_steps=0", "training.eval_episodes=0", "training.progress=false",
                            *TINY]))
    assert load_checkpoint(run / CHECKPOINT).agent.image_shapes == {"image": (SIDE, SIDE, 3)}
    model = tmp_path / "model.onnx"
    assert run_export(compose("export", [f"checkpoint={run / CHECKPOINT}", f"out={model}"])) == 0
    policy = OnnxPolicy(model, threads=1, warmup=1)
    assert [(f.key, f.dtype) for f in policy.spec.obs_fields] == [("state", "float32"), ("image", "uint8")]

    srv = ControlServer(policy, "tcp://127.0.0.1:*").start()
    try:
        cfg = compose("drive", ["driver=sim", f"env.name={TASK}", f"server={srv.address}", "episodes=1",
                                "realtime=false", "env.max_episode_steps=10", f"env.image_size={SIDE}",
                                "env.render_fast=true"])
        assert isinstance(cfg, DriveConfig)
        assert run_drive(cfg) == 0
    finally:
        srv.stop()
    out = capsys.readouterr().out
    assert "episode 1/1" in out and srv.stats.chunks >= 2 and not srv.stats.errors
