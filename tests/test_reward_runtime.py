"""The robot-side success detector on hand-built networks whose probabilities are known, exported
through the real exporter and run in onnxruntime: debounce, threshold, overrules, spec refusal,
NaN handling."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qc_robot.policies.base import ObsField
from qc_robot.policies.onnx_metadata import MetadataError
from qc_robot.policies.success_detector import DetectorMetadata, SuccessDetector, first_fire
from qc_robot.reward.export import export_detector
from qc_robot.reward.model import DetectorNet

SPEC = [ObsField("state", (2,), "float32")]
P_HIGH = 1.0 / (1.0 + math.exp(-5.0))  # sigmoid(10·1 − 5) ≈ 0.9933
P_LOW = 1.0 / (1.0 + math.exp(5.0))  # sigmoid(10·0 − 5) ≈ 0.0067


def _export(net: DetectorNet, path: Path, threshold: float = 0.5, debounce: int = 3) -> Path:
    meta = DetectorMetadata(obs_fields=list(SPEC), threshold=threshold, debounce=debounce, task="unit")
    frames = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 2.0]], np.float32)
    out, err = export_detector(net, meta, path, frames, {})
    assert err <= 1e-5
    return out


@pytest.fixture(scope="module")
def linear_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """P(success) = sigmoid(10·state[0] − 5): frames with state[0] = 1 are above 0.5, 0 below."""
    net = DetectorNet(2, {}, hidden=[])
    with torch.no_grad():
        lin = net.head.net[0]
        lin.weight.copy_(torch.tensor([[10.0, 0.0]]))
        lin.bias.fill_(-5.0)
    return _export(net, tmp_path_factory.mktemp("det") / "linear.onnx")


@pytest.fixture(scope="module")
def overflow_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Finite for |state[0]| < 1e8, NaN beyond: both hidden units overflow to +inf and the output
    layer subtracts them (inf − inf)."""
    net = DetectorNet(2, {}, hidden=[2])
    with torch.no_grad():
        first, last = net.head.net[0], net.head.net[2]
        first.weight.copy_(torch.tensor([[1e30, 0.0], [1e30, 0.0]]))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, -1.0]]))
        last.bias.zero_()
    return _export(net, tmp_path_factory.mktemp("det") / "overflow.onnx")


def _obs(x: float) -> dict[str, np.ndarray]:
    return {"state": np.array([x, 0.0])}  # float64, as the sim driver sends it


def test_fires_after_k_consecutive_frames_and_latches(linear_detector):
    det = SuccessDetector.load(linear_detector)
    assert (det.threshold, det.debounce) == (0.5, 3) and det.meta.task == "unit"
    det.reset()
    xs = [1, 1, 0, 1, 1, 1, 0, 1]
    ds = [det.update(_obs(x)) for x in xs]
    assert [d.streak for d in ds] == [1, 2, 0, 1, 2, 3, 0, 1]
    assert [d.fired for d in ds] == [False] * 5 + [True] * 3  # the third frame of the second run
    assert all(d.fired_at == 5 for d in ds[5:]) and det.fires == 1
    np.testing.assert_allclose([d.probability for d in ds], [P_HIGH if x else P_LOW for x in xs], atol=1e-6)
    assert first_fire([d.probability for d in ds], 0.5, 3) == 5  # the batch rule the metrics use agrees
    det.reset()
    d = det.update(_obs(1))
    assert not d.fired and d.streak == 1 and det.episode == 1  # reset forgets the run and the latch


def test_threshold_and_debounce_can_be_overridden_at_load(linear_detector):
    strict = SuccessDetector.load(linear_detector, threshold=0.999)
    strict.reset()
    assert not any(strict.update(_obs(1)).fired for _ in range(10))
    eager = SuccessDetector.load(linear_detector, debounce=1)
    eager.reset()
    assert eager.update(_obs(1)).fired
    with pytest.raises(ValueError, match="threshold"):
        SuccessDetector.load(linear_detector, threshold=1.5)


def test_operator_overrules_either_way_are_counted(linear_detector, caplog):
    det = SuccessDetector.load(linear_detector)
    det.reset()
    for _ in range(3):
        det.update(_obs(1))
    assert det.fired
    assert det.record_verdict(True) is None  # agrees
    det.reset()
    for _ in range(3):
        det.update(_obs(1))
    with caplog.at_level(logging.WARNING, logger="qc_robot.reward"):
        o = det.record_verdict(False)
    assert o is not None and o.kind == "false_positive" and o.episode == 1 and o.fired_at == 2
    assert "overruled on episode 1" in caplog.text
    det.reset()
    for _ in range(10):
        det.update(_obs(0))
    o = det.record_verdict(True)
    assert o is not None and o.kind == "false_negative" and o.fired_at is None
    assert o.max_probability == pytest.approx(P_LOW, abs=1e-6)
    det.reset()
    det.update(_obs(0))
    assert det.record_verdict(False) is None
    s = det.summary()
    assert (s["episodes"], s["verdicts"], s["overrules"]) == (4, 4, 2)
    assert (s["overrules_false_positive"], s["overrules_false_negative"], s["fires"]) == (1, 1, 2)


def test_a_detector_that_does_not_match_the_robot_is_refused_in_one_line(linear_detector):
    from qc_robot.drivers.registry import make_safe_driver

    det = SuccessDetector.load(linear_detector)
    det.check_spec([ObsField("state", (2,), "float64"), ObsField("image", (8, 8, 3), "uint8")])  # extra keys: fine
    robot = make_safe_driver("mock").spec.obs_fields  # a real driver's spec: state is wider
    with pytest.raises(ValueError) as e:
        det.check_spec(robot)
    msg = str(e.value)
    assert "\n" not in msg and "'state' is [" in msg and "the detector reads [2]" in msg
    with pytest.raises(ValueError, match="'state' missing"):
        det.check_spec([ObsField("joints", (2,), "float32")])


def test_nan_input_gives_no_reward_and_is_counted(linear_detector, caplog):
    det = SuccessDetector.load(linear_detector, debounce=2)
    det.reset()
    assert det.update(_obs(1)).streak == 1
    with caplog.at_level(logging.WARNING, logger="qc_robot.reward"):
        d = det.update(_obs(float("nan")))
        d2 = det.update({"state": np.array([np.inf, 0.0])})
    assert not d.valid and math.isnan(d.probability) and d.streak == 0 and not d.fired
    assert not d2.valid and det.nan_frames == 2
    assert caplog.text.count("non-finite") == 1  # one warning per episode; the counter has them all
    assert not det.update(_obs(1)).fired and det.update(_obs(1)).fired  # the run restarted after NaN


def test_nan_output_gives_no_reward_and_is_counted(overflow_detector):
    det = SuccessDetector.load(overflow_detector, debounce=1)
    det.reset()
    ok = det.update(_obs(0.5))
    assert ok.valid and ok.fired  # finite and above threshold
    det.reset()
    d = det.update(_obs(1e10))  # finite input, the graph returns NaN
    assert not d.valid and math.isnan(d.probability) and not d.fired and det.nan_frames == 1


def test_bad_observations_and_files_are_one_line_errors(linear_detector):
    det = SuccessDetector.load(linear_detector)
    with pytest.raises(ValueError, match="'state' missing"):
        det.update({"image": np.zeros(3)})
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        det.update({"state": np.zeros(3)})
    policy = Path(__file__).resolve().parents[1] / "qc_robot" / "assets" / "cube-single-task1.onnx"
    with pytest.raises(MetadataError, match="a policy file, not a detector") as e:
        SuccessDetector.load(policy)
    assert "\n" not in str(e.value)


def test_metadata_round_trips_and_refuses_bad_values():
    meta = DetectorMetadata(obs_fields=[ObsField("state", (3,)), ObsField("cam", (8, 8, 3), "uint8")],
                            threshold=0.7, debounce=4, task="t", metrics={"valid": {"frame": {"f1": 0.9}}})
    back = DetectorMetadata.from_props(meta.to_props())
    assert back.obs_fields == meta.obs_fields and back.obs_dim == 3 and [f.key for f in back.image_fields] == ["cam"]
    assert (back.threshold, back.debounce, back.metrics) == (0.7, 4, meta.metrics)
    props = meta.to_props()
    props["obs_dim"] = "5"
    with pytest.raises(MetadataError, match="obs_dim"):
        DetectorMetadata.from_props(props)
    with pytest.raises(MetadataError, match="debounce"):
        DetectorMetadata(obs_fields=[ObsField("s", (1,))], debounce=0).to_props()


def test_detector_exports_carry_no_build_machine_paths(linear_detector, overflow_detector):
    """As for the policy: the dynamo exporter's per-node stack traces ('File "/home/.../model.py"')
    would ship this machine's source paths in a file that travels to the robot PC."""
    import onnx

    from qc_robot.export.scrub import build_paths

    for path in (linear_detector, overflow_detector):
        assert build_paths(onnx.load(path)) == [], path
        assert b'File "' not in path.read_bytes(), path


def test_the_runtime_runs_with_torch_and_mujoco_blocked(linear_detector):
    """The robot PC loads and runs the detector with numpy and onnxruntime alone."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "mujoco", "ogbench"):
                    raise ImportError("blocked on the robot PC: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from qc_robot.policies.success_detector import SuccessDetector
        det = SuccessDetector.load({str(linear_detector)!r})
        det.reset()
        fired = [det.update({{"state": np.array([1.0, 0.0])}}).fired for _ in range(3)]
        print("ok", fired, sorted(m for m in ("torch", "mujoco") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok [False, False, True] []"
