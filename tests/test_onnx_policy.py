"""The torch-free runtime: metadata schema, refusals with clear messages, predict, no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_fixtures import HIGH, LOW, OBS_DIM, Variant, export, noise_shape

from qc_robot.policies.base import ChunkResult, Policy
from qc_robot.policies.onnx_metadata import FORMAT_VERSION, MetadataError, PolicyMetadata
from qc_robot.policies.onnx_policy import OnnxPolicy

REPO = Path(__file__).resolve().parents[1]
VARIANT = Variant("best_of_n", 5)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[PolicyMetadata, Path]:
    _, meta, path = export(VARIANT, tmp_path_factory.mktemp("policy") / "model.onnx")
    return meta, path


def _obs(**override: object) -> dict[str, object]:
    obs: dict[str, object] = {
        "joint_pos": np.zeros(4, np.float64),
        "target": np.ones(2, np.float32),
    }
    obs.update(override)
    return obs


def _rewrite(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, edit(props))
    onnx.save(m, str(dst))
    return dst


def test_metadata_round_trip(model: tuple[PolicyMetadata, Path]) -> None:
    meta, path = model
    back = PolicyMetadata.from_props(meta.to_props())
    assert back.to_props() == meta.to_props()
    loaded = OnnxPolicy(path, warmup=1).meta
    assert loaded.to_props() == meta.to_props()
    assert loaded.obs_fields == meta.obs_fields and loaded.noise_input
    assert loaded.train_step == 123 and loaded.config_hash == "abc123" and loaded.torch_version


def test_predict_returns_chunk_in_limits(model: tuple[PolicyMetadata, Path]) -> None:
    _, path = model
    policy = OnnxPolicy(path, providers="cpu", threads=1, warmup=2)
    assert isinstance(policy, Policy) and policy.provider == "CPUExecutionProvider"
    assert policy.spec.chunk_len == 5 and policy.spec.control_hz == 20.0
    np.testing.assert_array_equal(policy.spec.action_low, LOW)
    res = policy.predict(_obs(extra_camera=np.zeros((2, 2))))  # keys outside the spec are ignored
    assert isinstance(res, ChunkResult) and res.infer_s > 0
    assert res.actions.shape == (5, 3) and res.actions.dtype == np.float32
    assert np.all(res.actions >= LOW) and np.all(res.actions <= HIGH)


def test_predict_batch_with_noise_is_deterministic(model: tuple[PolicyMetadata, Path]) -> None:
    _, path = model
    policy = OnnxPolicy(path, warmup=0)
    obs = np.random.default_rng(0).normal(size=(3, OBS_DIM))
    noise = np.random.default_rng(1).normal(size=(3, *noise_shape(VARIANT)))
    np.testing.assert_array_equal(
        policy.predict_batch(obs, noise), policy.predict_batch(obs, noise)
    )
    with pytest.raises(ValueError, match="noise must be"):
        policy.predict_batch(obs, noise[:, :2])


def test_each_session_draws_its_own_noise(model: tuple[PolicyMetadata, Path]) -> None:
    """Two sessions of one file in one process (a server swapping in pushed policies) sample
    different chunks for the same observation; onnxruntime's in-graph RandomNormal gave both the
    same draws. A seed makes a session's draws reproducible."""
    _, path = model
    obs = _obs()
    a, b = OnnxPolicy(path, warmup=10), OnnxPolicy(path, warmup=10)
    assert not np.allclose(a.predict(obs).actions, b.predict(obs).actions)
    s1, s2 = OnnxPolicy(path, warmup=0, seed=3), OnnxPolicy(path, warmup=0, seed=3)
    np.testing.assert_array_equal(s1.predict(obs).actions, s2.predict(obs).actions)


@pytest.mark.parametrize(
    ("obs", "message"),
    [
        (_obs(joint_pos=np.zeros(5)), r"'joint_pos' has shape \(5,\), expected \(4,\)"),
        (_obs(target=np.array([0.0, np.nan])), "'target' has non-finite values"),
        ({"joint_pos": np.zeros(4)}, "'target' missing"),
        (_obs(target=np.array(["a", "b"])), "'target' has dtype"),
    ],
)
def test_bad_observations_are_refused(
    model: tuple[PolicyMetadata, Path], obs: dict, message: str
) -> None:
    policy = OnnxPolicy(model[1], warmup=0)
    with pytest.raises(ValueError, match=message):
        policy.predict(obs)


def test_file_without_metadata_is_refused(
    model: tuple[PolicyMetadata, Path], tmp_path: Path
) -> None:
    path = _rewrite(model[1], tmp_path / "plain.onnx", lambda p: {})
    with pytest.raises(MetadataError, match="'format' missing"):
        OnnxPolicy(path, warmup=0)


def test_unknown_format_version_is_refused(
    model: tuple[PolicyMetadata, Path], tmp_path: Path
) -> None:
    path = _rewrite(model[1], tmp_path / "v99.onnx", lambda p: {**p, "format_version": "99"})
    with pytest.raises(MetadataError, match=f"format_version 99 .*reads {FORMAT_VERSION}"):
        OnnxPolicy(path, warmup=0)


def test_missing_metadata_key_is_named(model: tuple[PolicyMetadata, Path], tmp_path: Path) -> None:
    path = _rewrite(
        model[1],
        tmp_path / "nokey.onnx",
        lambda p: {k: v for k, v in p.items() if k != "chunk_len"},
    )
    with pytest.raises(MetadataError, match="'chunk_len' missing"):
        OnnxPolicy(path, warmup=0)


def test_runtime_imports_without_torch(model: tuple[PolicyMetadata, Path]) -> None:
    """A robot PC has neither torch nor mujoco: block both and serve the exported file."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "mujoco"):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from qc_robot.policies.onnx_policy import OnnxPolicy
        policy = OnnxPolicy({str(model[1])!r}, warmup=1)
        res = policy.predict({{"joint_pos": np.zeros(4), "target": np.zeros(2)}})
        assert res.actions.shape == (5, 3), res.actions.shape
        assert not any(m.split(".")[0] in ("torch", "mujoco") for m in sys.modules)
        print("ok", policy.provider)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


# -- files exported before real-time chunking ------------------------------------------------------

LEGACY = {name: REPO / "tests" / "fixtures" / f"legacy_v1_{name}.onnx" for name in ("best_of_n", "fql")}


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_file_still_loads_and_predicts(name: str) -> None:
    """A file from the exporter before RTC (no prev_* inputs, no rtc keys) serves as before."""
    from qc_robot.policies.base import ChunkGuide

    policy = OnnxPolicy(LEGACY[name], warmup=1)
    assert not policy.meta.rtc and not policy.supports_guidance
    assert "rtc" not in policy.meta.extra and policy.meta.format_version == 1
    res = policy.predict(_obs())
    assert res.actions.shape == (4, 3) and res.frozen == 0
    assert np.all(res.actions >= LOW) and np.all(res.actions <= HIGH)
    guide = ChunkGuide(np.full((4, 3), 0.5 * (LOW + HIGH), np.float32), delay=2, overlap=3)
    guided = policy.predict(_obs(), guide)  # the guide is ignored: a plain chunk
    assert guided.frozen == 0 and guided.actions.shape == (4, 3)
    assert np.all(guided.actions >= LOW) and np.all(guided.actions <= HIGH)


def test_rtc_file_freezes_the_prefix_it_is_given(model: tuple[PolicyMetadata, Path]) -> None:
    from qc_robot.policies.base import ChunkGuide

    policy = OnnxPolicy(model[1], warmup=0)
    assert policy.meta.rtc and policy.supports_guidance
    prev = policy.predict(_obs()).actions
    guide = ChunkGuide(np.concatenate([prev[2:], np.zeros((2, 3), np.float32)]), delay=2, overlap=3)
    res = policy.predict(_obs(), guide)
    assert res.frozen == 2
    np.testing.assert_array_equal(res.actions[:2], prev[2:4])  # bit-exact, not approximately
    assert np.all(res.actions >= LOW) and np.all(res.actions <= HIGH)
    with pytest.raises(ValueError, match="guide actions must be"):
        policy.predict(_obs(), ChunkGuide(prev[:2], delay=1, overlap=2))
