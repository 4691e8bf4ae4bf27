"""Calibration: files, latency through a real server and driver, dataset statistics, system
identification against a hidden-parameter sim robot, and the sim driver's use of the file.

Real MuJoCo, real sockets on 127.0.0.1, real HDF5. Stated tolerances (sysid, 3 x 50 steps of
excitation from a robot with kp x0.7, damping x2 and a 2-step control delay): kp and damping
within 15 %, the delay exact, the replay error cut at least 5x, within a budget of replays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qc_robot.calibration.files import (
    Calibration,
    CalibrationError,
    load_calibration,
    save_calibration,
)

TASK = "cube-single-task1"
HIDDEN = {"kp": 0.7, "damping": 2.0, "armature": 1.0, "frictionloss": 0.0}
HIDDEN_DELAY = 2
MAX_REPLAYS = 2000
"""Trajectory replays a default sysid of 3 x 50 lockstep rows may cost: its global stage, local
stages, delay scans and profiles together stay well under this; a search that ran away would not."""


def _physics(params: dict[str, float], delay: int, ranges: dict[str, list[float]] | None = None) -> dict[str, Any]:
    return {"params": params, "ranges": ranges or {}, "control_delay_steps": delay}


def _cal_file(tmp_path: Path, name: str = "robot", **physics: Any) -> Path:
    cal = Calibration(robot_id=name, task=TASK, physics=_physics(**physics) if physics else None)
    return save_calibration(cal, tmp_path / f"{name}.json")


# -- files ---------------------------------------------------------------------------------------


def test_file_roundtrip_and_content_id(tmp_path: Path) -> None:
    p = _cal_file(tmp_path, params=HIDDEN, delay=2, ranges={"kp": [0.6, 0.8]})
    cal = load_calibration(p, robot_id="robot", task=TASK)
    assert cal.physics is not None and cal.physics["params"] == HIDDEN and cal.control_delay_steps == 2
    assert cal.id.startswith("robot@") and len(cal.id) == len("robot@") + 12
    assert json.loads(p.read_text())["id"] == cal.id
    cal.physics["params"]["kp"] = 0.71  # any content change gives a new id; the timestamp does not
    assert cal.id != load_calibration(p).id
    cal2 = load_calibration(p)
    cal2.created, cal2.notes = "yesterday", "re-labelled"
    assert cal2.id == load_calibration(p).id


def _mutate(data: dict[str, Any], path: str, value: Any) -> None:
    *head, last = path.split(".")
    for k in head:
        data = data[k]
    if value is KeyError:
        del data[last]
    else:
        data[last] = value


@pytest.mark.parametrize("path,value,message", [
    ("format", "something-else", "not a calibration file"),
    ("version", 2, "newer qc-robot"),
    ("version", 0, "reads version 1"),
    ("robot_id", KeyError, "missing field 'robot_id'"),
    ("control_hz", float("nan"), "control_hz is NaN"),
    ("physics.params.kp", float("nan"), "physics.params.kp is NaN"),
    ("physics.ranges.kp", [0.8, 0.6], "inverted"),
    ("physics.ranges.kp", [0.01, 0.6], "leaves the allowed"),
    ("physics.params.stiction", 1.0, "unknown parameter 'stiction'"),
    ("physics.control_delay_steps", -1, "control_delay_steps must be an integer in"),
    ("physics.ranges", KeyError, "missing field 'ranges'"),
])
def test_bad_files_are_refused_with_clear_messages(tmp_path: Path, path: str, value: Any, message: str) -> None:
    p = _cal_file(tmp_path, params=HIDDEN, delay=2, ranges={"kp": [0.6, 0.8]})
    data = json.loads(p.read_text())
    _mutate(data, path, value)
    p.write_text(json.dumps(data))  # json writes NaN literally, as a careless tool would
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(")) as e:
        load_calibration(p)
    assert str(p) in str(e.value)


def test_mismatched_or_missing_files_are_refused(tmp_path: Path) -> None:
    p = _cal_file(tmp_path, params=HIDDEN, delay=0)
    with pytest.raises(CalibrationError, match="for robot 'robot', not 'other'"):
        load_calibration(p, robot_id="other")
    with pytest.raises(CalibrationError, match="measured on task 'cube-single-task1'"):
        load_calibration(p, task="cube-double-task2")
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(tmp_path / "broken.json")


# -- normalization -------------------------------------------------------------------------------


def test_normalization_matches_numpy(tiny_dataset: Path) -> None:
    import h5py

    from qc_robot.calibration.normalization import dataset_stats

    st = dataset_stats(tiny_dataset)
    with h5py.File(tiny_dataset, "r") as f:
        demos = sorted(f["data"], key=lambda k: int(k.split("_")[1]))
        obs = np.concatenate([f[f"data/{d}/obs/state"][()] for d in demos]).astype(np.float32)
        act = np.concatenate([f[f"data/{d}/actions"][()] for d in demos]).astype(np.float32)
    o = st["obs"]["state"]
    np.testing.assert_allclose(o["mean"], obs.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(o["std"], obs.astype(np.float64).std(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(o["min"], obs.min(0))
    np.testing.assert_allclose(o["percentiles"]["p95"], np.percentile(obs.astype(np.float64), 95, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(st["action_limits"]["low"], act.min(0))
    np.testing.assert_array_equal(st["action_limits"]["high"], act.max(0))
    assert st["transitions"] == len(act) and o["shape"] == [obs.shape[1]]
    cal = Calibration(robot_id="n", task=TASK, normalization=st)  # the section validates
    save_calibration(cal, tiny_dataset.parent / "n.json")


# -- the sim driver with a calibration -----------------------------------------------------------


def test_sim_driver_applies_calibration_and_randomizes_per_episode(tmp_path: Path) -> None:
    from qc_robot.drivers.executor import ChunkExecutor
    from qc_robot.drivers.sim import SimConfig, SimDriver

    ranges = {"kp": [0.6, 0.8], "damping": [1.5, 2.5], "frictionloss": [0.0, 0.5]}
    p = _cal_file(tmp_path, params=HIDDEN, delay=HIDDEN_DELAY, ranges=ranges)
    cal = load_calibration(p)
    fixed = SimDriver(SimConfig(env=TASK, realtime=False, calibration=str(p)))
    fixed.connect()
    u = fixed._env.unwrapped
    assert fixed.calibration_id == cal.id and fixed._latency_steps == HIDDEN_DELAY
    np.testing.assert_allclose(u.model.actuator_gainprm[:6, 0], 0.7 * np.array([4500, 4500, 4500, 2000, 2000, 500]))
    np.testing.assert_allclose(u.model.actuator_biasprm[:6, 2], 2.0 * np.array([-400, -400, -400, -100, -100, -100]))
    obs0 = fixed.reset(0)["state"]  # the 2-step delay: the first two commands are held
    for _ in range(HIDDEN_DELAY):
        fixed.send_action(np.array([1.0, 0, 0, 0, 0]))
    held = fixed.get_observation()["state"][:6]
    fixed.send_action(np.array([1.0, 0, 0, 0, 0]))
    moved = fixed.get_observation()["state"][:6]
    assert np.abs(moved - held).max() > 5 * np.abs(held - obs0[:6]).max()  # only gravity sag before
    fixed.close()

    rnd = SimDriver(SimConfig(env=TASK, realtime=False, calibration=str(p), randomize=True))
    draws = []
    for seed in range(6):
        rnd.reset(seed)
        draws.append(rnd.physics_params)
        for k, (lo, hi) in ranges.items():
            assert lo <= draws[-1][k] <= hi
        assert draws[-1]["armature"] == 1.0  # no range: the fitted value
        g = rnd._env.unwrapped.model.actuator_gainprm[0, 0]
        assert g == pytest.approx(4500 * draws[-1]["kp"])
    assert len({d["kp"] for d in draws}) == 6
    rnd.reset(3)
    assert rnd.physics_params == draws[3]  # seeded: the same episode gets the same physics
    rnd.close()
    with pytest.raises(ValueError, match="randomize needs"):
        SimDriver(SimConfig(env=TASK, randomize=True))
    with pytest.raises(CalibrationError, match="measured on task"):
        SimDriver(SimConfig(env="cube-double-task2", calibration=str(p)))
    assert ChunkExecutor(None, 5, "latency_aware", initial_delay_steps=3).delay_steps == 3  # type: ignore[arg-type]


def test_calibration_id_reaches_hello_and_logged_episodes(tmp_path: Path) -> None:
    import h5py

    from qc_robot.config import EnvConfig
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import run_drive
    from qc_robot.policies.scripted import HoldPolicy, simple_spec
    from qc_robot.server.app import ControlServer
    from qc_robot.server.episode_log import EpisodeLogger

    p = _cal_file(tmp_path, params=HIDDEN, delay=1)
    srv = ControlServer(HoldPolicy(simple_spec(28, 5, 5)), "tcp://127.0.0.1:*",
                        episode_logger=EpisodeLogger(str(tmp_path / "logs"), {"source": "test"})).start()
    try:
        cfg = DriveConfig(driver="sim", env=EnvConfig(TASK, max_episode_steps=10), server=srv.address, episodes=1,
                          realtime=False, calibration=str(p))
        assert run_drive(cfg) == 0
    finally:
        srv.stop()
    with h5py.File(srv.logger.path, "r") as f:
        assert f["data/demo_0"].attrs["calibration_id"] == load_calibration(p).id


# -- latency through a real server and driver -----------------------------------------------------


def test_latency_recovers_injected_actuation_delay() -> None:
    """The step test on the lockstep sim, whose 100 ms latency is exactly 2 steps: the detection
    is checked without the machine's scheduling in it (a loaded machine shifts wall-clock reads).
    The wall-clock accuracy, 0-500 ms on the realtime sim, is benchmarks/calibration_latency.py's."""
    from qc_robot.calibration.latency import measure_latency
    from qc_robot.drivers.sim import SimConfig, SimDriver
    from qc_robot.policies.scripted import HoldPolicy, simple_spec
    from qc_robot.server.app import ControlServer

    latency_ms, hz = 100.0, 20.0
    driver = SimDriver(SimConfig(env=TASK, latency_ms=latency_ms, realtime=False, max_episode_steps=100_000))
    srv = ControlServer(HoldPolicy(simple_spec(28, 5, 5)), "tcp://127.0.0.1:*").start()
    try:
        lat = measure_latency(driver, srv.address, requests=30, trials=6)
    finally:
        srv.stop()
        driver.close()
    assert lat["actuation_delay_steps"] == round(latency_ms * hz / 1e3)
    assert lat["actuation_ms"]["n"] == 6 and lat["actuation_ms"]["p50"] == latency_ms
    r = lat["rtt_ms"]
    assert r["n"] == 30 and 0 < r["p50"] <= r["p90"] <= r["p99"]
    assert not lat["realtime"] and lat["inference_delay_steps"] == 0  # lockstep: the world waits for replies


# -- system identification against a hidden-parameter robot --------------------------------------


def test_excitation_keeps_the_gripper_open_unless_asked() -> None:
    from qc_robot.calibration.excitation import excitation_actions

    a = excitation_actions(60, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(a[:, 4], -0.5)  # a relative command: the target stays fully open
    assert a[:, :4].std(axis=0).min() > 0.2 and np.abs(a).max() <= 1.0
    sq = excitation_actions(60, 5, np.random.default_rng(0), gripper="square")
    assert set(np.unique(sq[:, 4])) == {-0.5, 0.5}
    np.testing.assert_array_equal(sq[:, :4], a[:, :4])
    with pytest.raises(ValueError, match="gripper must be"):
        excitation_actions(5, 5, np.random.default_rng(0), gripper="closed")


def test_sysid_recovers_hidden_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qc_robot.calibration.cli import CalibrateConfig, run_calibrate

    hidden = _cal_file(tmp_path, "hidden", params=HIDDEN, delay=HIDDEN_DELAY)
    data = str(tmp_path / "excite.hdf5")
    common = dict(robot_id="fitted", task=TASK, dataset=data, out=str(tmp_path / "fitted.json"))
    # the "robot": the sim driver with hidden physics and delay, lockstep, logging MuJoCo states
    assert run_calibrate(CalibrateConfig(step="excite", realtime=False, driver_args={"calibration": str(hidden)},
                                         **common)) == 0
    assert run_calibrate(CalibrateConfig(step="sysid", max_iters=12, **common)) == 0
    out = capsys.readouterr().out
    cal = load_calibration(tmp_path / "fitted.json", robot_id="fitted", task=TASK)
    phys = cal.physics
    assert phys is not None
    fit = phys["params"]
    assert fit["kp"] == pytest.approx(HIDDEN["kp"], rel=0.15), out
    assert fit["damping"] == pytest.approx(HIDDEN["damping"], rel=0.15), out
    assert phys["control_delay_steps"] == HIDDEN_DELAY, out
    assert phys["fit"]["error_before"] >= 5 * phys["fit"]["error_after"], out
    for k in ("kp", "damping"):
        lo, hi = phys["ranges"][k]
        assert lo <= fit[k] <= hi and lo < hi
    assert Path(phys["plot"]).stat().st_size > 10_000
    # the cost in replays, not seconds (a wall-clock bound failed under the shared CPU's load; the
    # fit's time is measured in benchmarks/calibration_matrix.py and reported in docs/calibration.md)
    assert phys["fit"]["evals"] <= MAX_REPLAYS, phys["fit"]["evals"]
