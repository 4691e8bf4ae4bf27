"""Bad input to ``qc-robot calibrate``: every one is a single line naming the file and the field,
with a non-zero exit, before any step uses the data (and nothing is written).

Real HDF5 files written with our EpisodeWriter, real calibration files, the real CLI entry point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qc_robot.calibration.cli import CalibrateConfig, run_calibrate
from qc_robot.calibration.files import (
    Calibration,
    CalibrationError,
    load_calibration,
    save_calibration,
)
from qc_robot.data.hdf5_io import EpisodeWriter
from qc_robot.sim.tasks import task_spec

TASK = "cube-single-task1"
PARAMS = {"kp": 0.7, "damping": 2.0, "armature": 1.0, "frictionloss": 0.0}


def _log(path: Path, task: str = TASK, env_args: dict[str, Any] | None = None, poison: str = "",
         n: int = 20, episodes: int = 2) -> Path:
    """A small robot log of ``task``'s widths; ``poison`` = 'group/key' gets a NaN in row 5."""
    spec = task_spec(task)
    rng = np.random.default_rng(0)
    args = {"task": task, "control_hz": spec.control_hz} if env_args is None else env_args
    with EpisodeWriter(path, args) as w:
        for _ in range(episodes):
            arrays = {"obs": rng.normal(size=(n, spec.obs_dim)), "next_obs": rng.normal(size=(n, spec.obs_dim)),
                      "actions": rng.uniform(-1, 1, (n, spec.act_dim)), "ctrl": rng.normal(size=(n, 7))}
            if poison:
                group = poison.split("/")[0]
                arrays[group][5, 3] = np.nan
            extras = {"ctrl": arrays["ctrl"]} if poison == "ctrl" else None  # the applied actuator targets
            w.add_episode(obs={"state": arrays["obs"]}, actions=arrays["actions"], rewards=np.zeros(n),
                          dones=np.zeros(n), next_obs={"state": arrays["next_obs"]}, extras=extras)
    return path


def _calibration(tmp_path: Path, fit: dict[str, Any] | None = None) -> Path:
    physics = {"params": PARAMS, "ranges": {"kp": [0.6, 0.8]}, "control_delay_steps": 1}
    if fit is not None:
        physics["fit"] = fit
    return save_calibration(Calibration("arm1", TASK, physics=physics), tmp_path / "arm1.json")


def _run(capsys: pytest.CaptureFixture[str], **kw: Any) -> tuple[int, str]:
    rc = run_calibrate(CalibrateConfig(robot_id="arm1", task=TASK, driver="", **kw))
    out = capsys.readouterr().out
    assert "Traceback" not in out
    return rc, out


def _one_error_line(out: str, *needles: str) -> None:
    lines = [ln for ln in out.splitlines() if ln.startswith("calibrate:")]
    assert len(lines) == 1, out
    for s in needles:
        assert s in lines[0], lines[0]


@pytest.mark.parametrize("poison", ["next_obs/state", "obs/state", "actions", "ctrl"])
def test_nan_in_a_log_is_refused_by_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               poison: str) -> None:
    cal = _calibration(tmp_path, fit={"error_after": 0.05})
    before = cal.read_text()
    data = _log(tmp_path / "bad.hdf5", poison=poison)
    for step in ("check", "sysid", "normalization"):
        rc, out = _run(capsys, step=step, dataset=str(data), out=str(cal))
        assert rc != 0, out
        _one_error_line(out, str(data), f"data/demo_0/{poison}[5, 3]", "NaN")
        assert "no drift" not in out and "wrote" not in out
    assert cal.read_text() == before  # nothing written


def test_log_of_another_task_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = _log(tmp_path / "double.hdf5", task="cube-double-task2")
    rc, out = _run(capsys, step="normalization", dataset=str(other), out=str(tmp_path / "n.json"))
    assert rc == 2
    _one_error_line(out, str(other), "env_args['task']", "cube-double-task2", TASK)
    assert not (tmp_path / "n.json").exists()
    # no task in env_args (a served-episode log): the widths give it away
    anon = _log(tmp_path / "anon.hdf5", task="cube-double-task2", env_args={"source": "qc-robot serve"})
    rc, out = _run(capsys, step="sysid", dataset=str(anon), out=str(tmp_path / "s.json"))
    assert rc == 2
    _one_error_line(out, str(anon), "obs width", TASK)
    rate = _log(tmp_path / "rate.hdf5", env_args={"control_hz": 50.0})
    rc, out = _run(capsys, step="normalization", dataset=str(rate), out=str(tmp_path / "r.json"))
    assert rc == 2
    _one_error_line(out, str(rate), "control_hz")


def test_missing_or_foreign_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _run(capsys, step="sysid", dataset=str(tmp_path / "nope.hdf5"), out=str(tmp_path / "s.json"))
    assert rc == 2
    _one_error_line(out, "nope.hdf5", "not found")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    rc, out = _run(capsys, step="normalization", dataset=str(tmp_path / "text.hdf5"), out=str(tmp_path / "s.json"))
    assert rc == 2
    _one_error_line(out, "text.hdf5", "not an HDF5 file")


@pytest.mark.parametrize("path,value,message", [
    ("physics.params", [0.7, 2.0], "physics.params must map parameter kinds to numbers"),
    ("physics.params.kp", "0.7", "physics.params.kp must be a number"),
    ("physics.ranges.kp", ["0.6", "0.8"], "physics.ranges.kp = ['0.6', '0.8'] must hold two numbers"),
    ("physics.ranges", [[0.6, 0.8]], "physics.ranges must map"),
    ("latency", {"rtt_ms": {"p50": "1", "p90": 2, "p99": 3}, "actuation_ms": {"p50": 1, "p90": 2, "p99": 3},
                 "inference_delay_steps": 1, "actuation_delay_steps": 1}, "latency.rtt_ms percentiles must be numbers"),
])
def test_malformed_calibration_sections_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str,
                                                     value: Any, message: str) -> None:
    p = _calibration(tmp_path)
    data = json.loads(p.read_text())
    node = data
    *head, last = path.split(".")
    for k in head:
        node = node[k]
    node[last] = value
    p.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_calibration(p)
    rc, out = _run(capsys, step="check", dataset=str(_log(tmp_path / "ok.hdf5")), out=str(p))
    assert rc == 2
    _one_error_line(out, str(p), message)


def test_check_without_a_calibrated_error_is_an_error_not_a_pass(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A calibration with physics but no fit report: the comparison has no reference (NaN)."""
    cal = _calibration(tmp_path)
    rc, out = _run(capsys, step="check", dataset=str(_log(tmp_path / "ok.hdf5", n=6, episodes=1)), out=str(cal),
                   steps=6, episodes=1)
    assert rc == 2, out
    _one_error_line(out, str(cal), "physics.fit.error_after", "cannot compare")
    assert "no drift" not in out
