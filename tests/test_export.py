"""Export: torch vs onnxruntime parity, limits, dynamic batch, in-graph noise, failure modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_fixtures import (
    HIGH,
    LOW,
    OBS_DIM,
    OBS_FIELDS,
    Variant,
    export,
    make_acting,
    make_meta,
    noise_shape,
    torch_reference,
)

from qc_robot.export.onnx_export import ExportParityError, export_policy

VARIANTS = {
    "best_of_n": Variant("best_of_n", 5, time_dims=8),  # Fourier time: step biases fold features
    "fql": Variant("fql", 5),
    "best_of_n_nstep": Variant("best_of_n", 1, q_agg="min"),  # action_chunking=False → H=1
    "fql_1step": Variant("fql", 1),  # horizon 1
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    v = VARIANTS[request.param]
    acting, meta, path = export(v, tmp_path_factory.mktemp("export") / f"{request.param}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return v, acting, meta, sess


@pytest.mark.parametrize("batch", [1, 7])
def test_parity_with_fixed_noise_and_dynamic_batch(exported, batch: int) -> None:
    v, acting, _, sess = exported
    rng = np.random.default_rng(batch)
    obs = rng.normal(0.0, 2.0, (batch, OBS_DIM)).astype(np.float32)
    noise = rng.normal(size=(batch, *noise_shape(v))).astype(np.float32)
    got = sess.run(["actions"], {"observation": obs, "noise": noise})[0]
    assert got.shape == (batch, v.chunk_len, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_reference(acting, obs, noise), atol=1e-4, rtol=0)


def test_actions_within_asymmetric_limits(exported) -> None:
    v, _, _, sess = exported
    rng = np.random.default_rng(0)
    obs = rng.normal(0.0, 50.0, (64, OBS_DIM)).astype(np.float32)  # far outside the data: saturates
    noise = 5.0 * rng.normal(size=(64, *noise_shape(v))).astype(np.float32)
    got = sess.run(["actions"], {"observation": obs, "noise": noise})[0]
    assert np.all(got >= LOW) and np.all(got <= HIGH)
    assert np.any(np.isclose(got, LOW)) and np.any(np.isclose(got, HIGH))  # clipping did happen


def test_in_graph_noise_differs_between_calls(exported) -> None:
    v, _, _, sess = exported
    obs = np.zeros((3, OBS_DIM), np.float32)
    a = sess.run(["actions"], {"observation": obs})[0]
    b = sess.run(["actions"], {"observation": obs})[0]
    assert a.shape == b.shape == (3, v.chunk_len, 3)
    assert not np.allclose(a, b)
    for x in (a, b):
        assert np.all(x >= LOW) and np.all(x <= HIGH)


def test_naive_graph_matches_lean(tmp_path: Path) -> None:
    v = VARIANTS["best_of_n"]
    # the plain graphs only: every RTC export already checks its lean branch against the naive one
    acting, _, lean = export(v, tmp_path / "lean.onnx", rtc=False)
    _, _, naive = export(v, tmp_path / "naive.onnx", lean=False, rtc=False)
    rng = np.random.default_rng(1)
    feed = {
        "observation": rng.normal(size=(5, OBS_DIM)).astype(np.float32),
        "noise": rng.normal(size=(5, *noise_shape(v))).astype(np.float32),
    }
    outs = [ort.InferenceSession(str(p)).run(["actions"], feed)[0] for p in (lean, naive)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def test_noise_input_false_samples_only(tmp_path: Path) -> None:
    _, _, path = export(Variant("fql", 2), tmp_path / "m.onnx", noise_input=False)
    model = onnx.load(str(path))
    # the only required input; the RTC inputs stay optional (initializer-backed), noise is gone
    defaults = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input if i.name not in defaults] == ["observation"]
    assert "noise" not in [i.name for i in model.graph.input]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["noise_input"] == "false"
    out = ort.InferenceSession(str(path)).run(
        ["actions"], {"observation": np.zeros((2, OBS_DIM), np.float32)}
    )[0]
    assert out.shape == (2, 2, 3) and np.all(out >= LOW) and np.all(out <= HIGH)


def test_parity_failure_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportParityError, match="parity_tol"):
        export(Variant("fql", 2), out, parity_tol=-1.0)  # nothing can be that close
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_match_policy(tmp_path: Path) -> None:
    acting = make_acting(Variant("best_of_n", 2))
    meta = make_meta(acting)
    meta.chunk_len = 3
    with pytest.raises(ValueError, match="chunk_len"):
        export_policy(acting, meta, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_run_export_from_checkpoint(tmp_path: Path) -> None:
    """CLI path: a saved checkpoint → verified model.onnx whose metadata comes from it."""
    from qc_robot.agent.agent import QCAgent
    from qc_robot.config import AgentConfig, ExportConfig, TrainConfig
    from qc_robot.export.onnx_export import run_export
    from qc_robot.policies.onnx_policy import OnnxPolicy
    from qc_robot.train.checkpoint import Checkpoint, config_hash, save_checkpoint

    agent_cfg = AgentConfig(
        hidden_dims=[32, 32], num_samples=4, flow_steps=3, horizon=3, device="cpu"
    )
    cfg = TrainConfig(agent=agent_cfg)
    agent = QCAgent(agent_cfg, OBS_DIM, 3, seed=0)
    ckpt = Checkpoint(
        agent=agent,
        config=cfg,
        step=7,
        obs_fields=OBS_FIELDS,
        action_low=LOW,
        action_high=HIGH,
        control_hz=10.0,
        config_hash=config_hash(cfg),
    )
    path = save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    out = tmp_path / "model.onnx"
    assert run_export(ExportConfig(checkpoint=str(path), out=str(out))) == 0
    policy = OnnxPolicy(out, warmup=1)
    assert policy.meta.train_step == 7 and policy.meta.control_hz == 10.0
    assert policy.meta.num_samples == 4 and policy.meta.config_hash == ckpt.config_hash
    res = policy.predict({"joint_pos": np.zeros(4), "target": np.zeros(2)})
    assert res.actions.shape == (3, 3)


def test_exports_carry_no_build_machine_paths(exported) -> None:
    """The dynamo exporter's per-node stack traces ('File "/home/.../networks.py"') are dropped."""
    from qc_robot.export.scrub import build_paths

    _, _, _, sess = exported
    model = onnx.load(sess._model_path)
    assert build_paths(model) == []
    assert qc_robot_root() not in model.SerializeToString().decode("latin-1")


def test_the_shipped_policy_carries_no_build_machine_paths() -> None:
    from qc_robot.assets import default_policy_path
    from qc_robot.export.scrub import build_paths

    assert build_paths(onnx.load(default_policy_path())) == []


def test_scrub_keeps_weights_and_outputs(tmp_path: Path) -> None:
    """A file with stack traces (as the exporter writes them) loses them and nothing else."""
    from qc_robot.export.scrub import build_paths, scrub_file
    from qc_robot.policies.onnx_policy import OnnxPolicy

    _, meta, path = export(VARIANTS["fql_1step"], tmp_path / "m.onnx")
    model = onnx.load(path)
    node = model.graph.node[-1]
    trace = node.metadata_props.add()
    trace.key, trace.value = "pkg.torch.onnx.stack_trace", 'File "/home/builder/qc_robot/agent/networks.py", line 33'
    onnx.save(model, path)
    weights = [t.SerializeToString() for t in model.graph.initializer]
    obs = np.random.default_rng(0).standard_normal((3, meta.obs_dim)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal((3, *meta.noise_shape)).astype(np.float32)
    before = OnnxPolicy(path, warmup=0).predict_batch(obs, noise)
    assert build_paths(onnx.load(path))
    assert scrub_file(path) >= 1
    after_model = onnx.load(path)
    assert build_paths(after_model) == []
    assert [t.SerializeToString() for t in after_model.graph.initializer] == weights
    np.testing.assert_array_equal(OnnxPolicy(path, warmup=0).predict_batch(obs, noise), before)


def qc_robot_root() -> str:
    import qc_robot

    return str(Path(qc_robot.__file__).resolve().parent.parent)
