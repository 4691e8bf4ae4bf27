"""Replay through the sim driver, validate on damaged files, merge/split round trips, the CLI."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from qc_robot.cli import main
from qc_robot.config import EnvConfig
from qc_robot.data import tools
from qc_robot.data.hdf5_io import DatasetError, load_flat
from qc_robot.drivers.safety import SafetyConfig
from qc_robot.teleop.config import TeleopConfig
from qc_robot.teleop.replay import load_demo, replay_actions
from qc_robot.teleop.session import build_driver, run_teleop

pytest.importorskip("ogbench")
ENV = "cube-single-task1"


def _record(out: str, seed: int, outcomes: list[str]) -> str:
    cfg = TeleopConfig(env=EnvConfig(name=ENV), device="scripted", out=out, realtime=False, time_scale=1000.0, seed=seed,
                       outcomes=outcomes, end_after=12, status=False)
    assert run_teleop(cfg) == 0
    return out


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> str:
    return _record(str(tmp_path_factory.mktemp("ds") / "demos.hdf5"), 0, ["auto", "failure", "auto"])


def _copy(src: str, tmp_path, name: str = "copy.hdf5") -> str:
    dst = str(tmp_path / name)
    shutil.copyfile(src, dst)
    return dst


def test_replay_reproduces_the_recording(demos):
    driver = build_driver(TeleopConfig(env=EnvConfig(name=ENV), realtime=False))
    driver.connect()
    try:
        for i in range(3):
            d = load_demo(demos, i)
            r = replay_actions(driver, d.actions, int(d.attrs["seed"]))
            assert r.steps == len(d.actions)
            np.testing.assert_array_equal(r.applied, d.actions)  # the recorded actions were the applied ones
            np.testing.assert_allclose(np.stack([o["state"] for o in r.observations]), d.obs["state"], atol=1e-5)
            assert r.success == (d.attrs["label"] == "success")
    finally:
        driver.close()


def test_replay_through_tighter_safety_limits(demos):
    d = load_demo(demos, 0)
    driver = build_driver(TeleopConfig(env=EnvConfig(name=ENV), realtime=False, safety=SafetyConfig(max_delta=[0.2])))
    driver.connect()
    try:
        r = replay_actions(driver, d.actions, int(d.attrs["seed"]))
    finally:
        driver.close()
    assert np.abs(np.diff(r.applied, axis=0)).max() <= 0.2 + 1e-6  # the layer limited every step
    assert driver.stats.delta_limited > 0
    np.testing.assert_array_equal(r.applied[0], d.actions[0])  # no previous command: nothing to limit


def test_info_summarises(demos):
    d = tools.info(demos)
    assert d["episodes"] == 3 and d["labels"] == {"success": 2, "failure": 1}
    assert d["success_rate"] == pytest.approx(2 / 3) and d["length_min"] == 12
    assert len(d["action_min"]) == 5 and d["action_nonfinite"] == 0
    assert "episodes     3" in tools.format_info(d)


@pytest.mark.parametrize("damage,message", [
    ("nan", "demo_1/actions contains NaN"),
    ("truncate", "demo_1/actions has 5 rows but attrs['num_samples'] = 12"),
    ("missing", "demo_1/rewards is missing"),
    ("next_obs_rows", "demo_1/next_obs/state has 3 rows"),
])  # fmt: skip
def test_validate_flags_damage(demos, tmp_path, damage, message):
    path = _copy(demos, tmp_path)
    with h5py.File(path, "a") as f:
        g = f["data/demo_1"]
        if damage == "nan":
            g["actions"][3, 2] = np.nan
        elif damage == "truncate":
            a = g["actions"][:5]
            del g["actions"]
            g["actions"] = a
        elif damage == "missing":
            del g["rewards"]
        else:
            a = g["next_obs/state"][:3]
            del g["next_obs/state"]
            g["next_obs/state"] = a
    problems = tools.validate(path)
    assert len(problems) == 1 and message in problems[0] and path in problems[0], problems
    assert main(["dataset", "validate", path]) == 1


def test_validate_reports_a_damaged_hdf5_and_a_leftover_journal(demos, tmp_path):
    path = _copy(demos, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(4000)  # cut the file: h5py's own errors become one clear message
    problems = tools.validate(path)
    assert len(problems) == 1 and path in problems[0]
    path2 = _copy(demos, tmp_path, "j.hdf5")
    open(path2 + ".journal", "wb").close()
    assert any("dataset recover" in p for p in tools.validate(path2))
    assert main(["dataset", "recover", path2]) == 0 and tools.validate(path2) == []


def test_merge_and_split_round_trip(demos, tmp_path):
    other = _record(str(tmp_path / "other.hdf5"), 10, ["failure", "success"])
    merged = str(tmp_path / "merged.hdf5")
    assert main(["dataset", "merge", demos, other, demos, f"out={merged}"]) == 0
    a, b, m = load_flat(demos), load_flat(other), load_flat(merged)
    assert len(m.episode_ends) == 5  # demos given twice: duplicates (same uuid) are skipped
    np.testing.assert_array_equal(m.actions, np.concatenate([a.actions, b.actions]))
    np.testing.assert_array_equal(m.observations, np.concatenate([a.observations, b.observations]))
    with h5py.File(merged) as f:
        assert f["data/demo_3"].attrs["source_demo"] == "demo_0"
        assert f["data/demo_4"].attrs["label"] == "success"

    assert main(["dataset", "split", merged, "ratio=0.6", "seed=3"]) == 0
    train, valid = load_flat(merged, filter_key="train"), load_flat(merged, filter_key="valid")
    assert (len(train.episode_ends), len(valid.episode_ends)) == (3, 2)
    assert not set(train.demo_names) & set(valid.demo_names)
    assert len(train) + len(valid) == len(m)
    again = tools.split(merged, 0.6, 3)
    assert (again[0], again[1]) == (train.demo_names, valid.demo_names)  # seeded: reproducible

    with h5py.File(other, "a") as f:
        f["data"].attrs["env_args"] = '{"task": "elsewhere"}'
    with pytest.raises(DatasetError, match="different env_args"):
        tools.merge([demos, other], str(tmp_path / "bad.hdf5"))
    assert not (tmp_path / "bad.hdf5").exists()


def test_cli_positional_arguments(demos, capsys):
    assert main(["dataset", "info", demos]) == 0
    assert "success      66.7%" in capsys.readouterr().out
    assert main(["replay", demos, "episode=1", "realtime=false", "time_scale=1000"]) == 0
    assert "max |applied - recorded| = 0" in capsys.readouterr().out
    assert main(["replay", demos, "episode=9", "realtime=false"]) == 2
    assert "no data/demo_9" in capsys.readouterr().err
