"""Bad input to ``qc-robot calibrate``: every one is a single line naming the file and the field,
with a non-zero exit, before any step uses the data (and nothing is written).

Real HDF5 files written with our EpisodeWriter, real calibration files, the real CLI entry point.
"""

from __future__ import annotations

import json
import re
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


# -- issue 28: every field checked on read (type, shape, range, consistency) -----------------------

LATENCY = {"rtt_ms": {"p50": 4.0, "p90": 6.0, "p99": 9.0, "mean": 4.5, "min": 2.0, "max": 10.0, "n": 50},
           "actuation_ms": {"p50": 98.0, "p90": 110.0, "p99": 120.0, "n": 8},
           "inference_delay_steps": 1, "actuation_delay_steps": 2, "obs_noise_std": 0.001, "control_hz": 20.0}


@pytest.mark.parametrize("path,value,message", [
    # a calibrated error that lets `check` pass any drift, or that is not a number at all
    ("physics.fit.error_after", 1e30, "physics.fit.error_after = 1e+30 is outside [0, 10]"),
    ("physics.fit.error_after", True, "physics.fit.error_after must be a number, got True"),
    ("physics.fit.error_after", "small", "physics.fit.error_after must be a number, got 'small'"),
    ("physics.fit.error_after", -0.1, "physics.fit.error_after = -0.1 is outside [0, 10]"),
    ("physics.fit", [1, 2], "physics.fit must be an object (the fit report), got list"),
    ("physics.fit.replay", "psychic", "physics.fit.replay must be one of"),
    ("physics.fit.latency_ms", [120.0, 80.0], "physics.fit.latency_ms = [120.0, 80.0] must be [low, high]"),
    ("physics.fit.convergence", "yes", "physics.fit.convergence must be an object"),
    # values that pass a type check but make no sense
    ("physics.control_delay_steps", 1_000_000, "physics.control_delay_steps must be an integer in [0, 40] steps"),
    ("physics.control_delay_steps", 2.0, "physics.control_delay_steps must be an integer"),
    ("control_hz", 1e9, "'control_hz' is 1000000000.0, must be in (0, 1000] Hz"),
    ("physics.ranges.kp", [0.8, 0.9], "physics.ranges.kp = [0.8, 0.9] does not contain the fitted physics.params.kp = 0.7"),
    ("physics.sigma.kp", -0.01, "physics.sigma.kp = -0.01 is outside [0, inf]"),
    ("latency.rtt_ms.p50", -5.0, "latency.rtt_ms.p50 = -5.0 is outside [0, 10000]"),
    ("latency.actuation_ms.p99", 1e7, "latency.actuation_ms.p99 = 10000000.0 is outside [-50, 10000]"),
    ("latency.inference_delay_steps", 1_000_000_000, "latency.inference_delay_steps must be an integer in [0, 40]"),
    ("latency.obs_noise_std", "low", "latency.obs_noise_std must be a number, got 'low'"),
    ("latency.control_hz", 50.0, "latency.control_hz is 50.0, the file's control_hz is 20"),
    ("latency.rtt_ms.n", 0, "latency.rtt_ms.n must be an integer >= 1"),
    ("task", 7, "'task' must be a string"),
])
def test_every_calibration_field_is_checked_on_read(tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str,
                                                    value: Any, message: str) -> None:
    physics = {"params": PARAMS, "ranges": {"kp": [0.6, 0.8]}, "control_delay_steps": 1,
               "sigma": {"kp": 0.01}, "fit": {"error_after": 0.05, "replay": "ctrl", "latency_ms": [40.0, 50.0]}}
    p = save_calibration(Calibration("arm1", TASK, latency=LATENCY, physics=physics), tmp_path / "arm1.json")
    data = json.loads(p.read_text())
    node = data
    *head, last = path.split(".")
    for k in head:
        node = node[k]
    node[last] = value
    p.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=re.escape(message)):
        load_calibration(p)
    rc, out = _run(capsys, step="check", dataset=str(_log(tmp_path / "ok.hdf5")), out=str(p))
    assert rc == 2, out
    _one_error_line(out, str(p), message)
    assert "no drift" not in out


def _realtime_log(path: Path, n: int = 20) -> Path:
    """``_log`` plus valid realtime fields (held, t_tick, t_sent) and the applied targets."""
    import h5py

    _log(path, n=n, episodes=1)
    with h5py.File(path, "r+") as f:
        g = f["data/demo_0"]
        held = np.zeros(n, np.int8)
        held[3] = 1
        t_tick = 0.05 * np.arange(n)
        g["held"], g["t_tick"], g["t_sent"] = held, t_tick, np.where(held > 0, -1.0, t_tick - 0.01)
        g["ctrl"] = np.zeros((n, 7))
    return path


def _replace(path: Path, key: str, value: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        g = f["data/demo_0"]
        if key in g:
            del g[key]
        g[key] = value


@pytest.mark.parametrize("key,make,message", [
    ("states", lambda n: np.zeros((n, 10)), "data/demo_0/states has width 10, cube-single-task1's model has"),
    ("ctrl", lambda n: np.zeros((n, 5)), "data/demo_0/ctrl has width 5, cube-single-task1's model has 7"),
    ("obs/state", lambda n: np.zeros((n, 1, 28)), "data/demo_0/obs/state has shape (20, 1, 28), expected (rows, width)"),
    ("actions", lambda n: np.zeros(n), "data/demo_0/actions has shape (20,), expected (rows, width)"),
    ("held", lambda n: np.full(n, 5), "data/demo_0/held[0] is 5, must be 0 or 1"),
    ("held", lambda n: np.zeros((n, 1)), "data/demo_0/held has shape (20, 1), expected (rows,)"),
    ("t_sent", lambda n: 0.05 * np.arange(n) - 0.01, "data/demo_0/t_sent[3] is 0.14 on a held row"),
    ("next_obs/state", lambda n: np.zeros((n, 27)), "data/demo_0/next_obs/state width 27 differs from obs/state's 28"),
])
def test_every_log_field_is_checked_on_read(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str,
                                            make: Any, message: str) -> None:
    cal = _calibration(tmp_path, fit={"error_after": 0.05})
    data = _realtime_log(tmp_path / "bad.hdf5")
    _replace(data, key, make(20))
    for step in ("check", "sysid"):
        rc, out = _run(capsys, step=step, dataset=str(data), out=str(cal))
        assert rc == 2, out
        _one_error_line(out, str(data), message)
        assert "no drift" not in out and "wrote" not in out


def test_env_args_control_hz_must_be_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _log(tmp_path / "hz.hdf5", env_args={"task": TASK, "control_hz": "20"})
    rc, out = _run(capsys, step="normalization", dataset=str(data), out=str(tmp_path / "n.json"))
    assert rc == 2
    _one_error_line(out, str(data), "env_args['control_hz'] must be a number, got '20'")


def test_a_log_with_every_row_in_contact_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No simulator states and a cube that moves on every row (this log's random observations): no
    row is left to score, said with the file, for check and sysid alike."""
    cal = _calibration(tmp_path, fit={"error_after": 0.05})
    data = _log(tmp_path / "busy.hdf5", n=6, episodes=1)
    for step in ("check", "sysid"):
        rc, out = _run(capsys, step=step, dataset=str(data), out=str(cal), episodes=1, steps=6, global_evals=0,
                       max_iters=1)
        assert rc == 2, out
        _one_error_line(out, str(data), "every row of the log is in contact with a cube")
