"""``drive reward_reload=true``: a detector re-exported while the robot runs is used from the next
episode on; a changed file that does not load or does not fit the robot is reported and the robot
keeps the detector it had. Real ZeroMQ server, real onnxruntime detectors (hand-built weights),
the mock arm."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qc_robot.cli import compose
from qc_robot.drivers.detector_reload import DetectorReload
from qc_robot.drivers.drive import run_drive
from qc_robot.policies.base import ChunkResult, ObsField
from qc_robot.policies.scripted import HoldPolicy, simple_spec
from qc_robot.policies.success_detector import DetectorMetadata, SuccessDetector
from qc_robot.reward.export import export_detector
from qc_robot.reward.model import DetectorNet
from qc_robot.server.app import ControlServer

OBS, ACT, H = 10, 5, 5  # the mock arm: state = [position (5), goal (5)]
FIELDS = [ObsField("state", (OBS,), "float32")]


def _export(path: Path, weight: list[float], bias: float, dim: int = OBS, fpr: float = 0.0) -> Path:
    """P(success) = sigmoid(weight · state + bias), threshold 0.5, debounce 3."""
    net = DetectorNet(dim, {}, hidden=[])
    with torch.no_grad():
        lin = net.head.net[0]
        lin.weight.copy_(torch.tensor([weight], dtype=torch.float32))
        lin.bias.fill_(bias)
    meta = DetectorMetadata(obs_fields=[ObsField("state", (dim,), "float32")], threshold=0.5, debounce=3,
                            task="unit", metrics={"valid": {"episode": {"fpr": fpr}}})
    out, err = export_detector(net, meta, path, np.zeros((2, dim), np.float32), {})
    assert err <= 1e-5
    return out


def _never(path: Path) -> Path:
    return _export(path, [0.0] * OBS, -10.0)  # p ≈ 0


def _past_line(path: Path) -> Path:
    return _export(path, [10.0] + [0.0] * (OBS - 1), -10.0, fpr=0.01)  # position[0] >= 1


def test_a_changed_file_is_swapped_in_once_and_the_counts_go_on(tmp_path, capsys):
    path = _never(tmp_path / "reward.onnx")
    old = SuccessDetector.load(path)
    old.reset()
    old.update({"state": np.zeros(OBS, np.float32)})
    old.record_verdict(True)  # a success it missed: one overrule to carry over
    watch = DetectorReload(str(path), SuccessDetector.load, FIELDS)
    assert watch.refresh(old, 1) is old  # unchanged: nothing loaded

    _past_line(path)  # re-exported in place (export_detector writes a temporary file, then os.replace)
    new = watch.refresh(old, 1)
    assert new is not old and watch.reloads == 1
    assert "reloaded before episode 1" in capsys.readouterr().out
    assert watch.refresh(new, 2) is new  # the same file again: not reloaded
    new.reset()
    fired = [new.update({"state": np.full(OBS, 2.0, np.float32)}).fired for _ in range(3)]
    assert fired == [False, False, True]  # the new weights decide
    s = new.summary()
    assert (s["episodes"], s["frames"], s["fires"], s["verdicts"], s["overrules_false_negative"]) == (2, 4, 1, 1, 1)


def test_a_changed_file_that_does_not_load_or_fit_keeps_the_previous_detector(tmp_path, capsys):
    path = _never(tmp_path / "reward.onnx")
    det = SuccessDetector.load(path)
    watch = DetectorReload(str(path), SuccessDetector.load, FIELDS)

    _export(tmp_path / "narrow.onnx", [1.0] * 4, 0.0, dim=4).replace(path)  # another robot's detector
    assert watch.refresh(det, 3) is det
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "'state' is [10], the detector reads [4]" in out[0] and "episode 3 keeps" in out[0]
    assert watch.refresh(det, 4) is det and capsys.readouterr().out == ""  # reported once, not each episode

    path.write_bytes(b"not an onnx file")  # a torn or foreign file
    assert watch.refresh(det, 5) is det
    path.unlink()  # gone (a retrain about to replace it): keep going with what we have
    assert watch.refresh(det, 6) is det
    assert watch.refused == 2 and watch.reloads == 0
    _past_line(path)
    assert watch.refresh(det, 7) is not det and watch.reloads == 1


class SwapsTheDetector(HoldPolicy):
    """Pushes position[0] up; its first chunk request (inside episode 0, after drive loaded the
    detector) re-exports the watched file with weights that fire past the line."""

    def __init__(self, path: Path) -> None:
        super().__init__(simple_spec(OBS, ACT, H), hold=[1.0, 0, 0, 0, 0])
        self.path, self.swapped = path, threading.Event()

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        if not self.swapped.is_set():
            _past_line(self.path)
            self.swapped.set()
        return super().predict(obs)


@pytest.mark.parametrize("reload", [True, False])
def test_drive_uses_the_retrained_detector_from_the_next_episode(tmp_path, capsys, reload):
    path = _never(tmp_path / "reward.onnx")
    srv = ControlServer(SwapsTheDetector(path), "tcp://127.0.0.1:*").start()
    try:
        cfg = compose("drive", [f"server={srv.address}", "driver=mock", f"reward_model={path}", "episodes=2",
                                "max_steps=30", f"reward_reload={str(reload).lower()}"])
        assert run_drive(cfg) == 0
    finally:
        srv.stop()
    out = capsys.readouterr().out
    if reload:
        assert "reloaded before episode 1" in out and "fired in 1/2 episodes" in out, out
        assert "reloaded 1 time(s), 0 changed file(s) refused" in out, out
    else:  # the file it loaded at start, to the end
        assert "reloaded" not in out and "fired in 0/2 episodes" in out, out


def test_reload_without_a_reward_model_is_refused_in_one_line(capsys):
    cfg = compose("drive", ["server=tcp://127.0.0.1:9", "connect_timeout_s=0.2", "driver=mock", "reward_reload=true"])
    assert run_drive(cfg) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "reward_reload watches reward_model" in out[0], out
