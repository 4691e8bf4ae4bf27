"""``qc-robot reward`` on episodes recorded for real: the scripted teleop operator on the lockstep
MuJoCo sim, labelled by the session as a person's verdict keys would label them."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from qc_robot.config import EnvConfig
from qc_robot.policies.success_detector import SuccessDetector, first_fire
from qc_robot.reward.config import RewardConfig
from qc_robot.reward.data import IGNORED, NEGATIVE, POSITIVE, frame_labels
from qc_robot.reward.train import hard_negatives, metrics_path, train_and_export
from qc_robot.teleop.config import TeleopConfig
from qc_robot.teleop.session import run_teleop

pytest.importorskip("ogbench")

EPISODES = 32
FRAME_F1 = 0.8
"""Stated held-out per-frame F1 on this set (measured 0.98-1.0 with these settings)."""
EPISODE_F1 = 0.8
"""Stated held-out per-episode F1 (measured 1.0)."""


def _record(out: Path, outcomes: list[str], end_after: int, **env: object) -> Path:
    cfg = TeleopConfig(driver="sim", env=EnvConfig(name="cube-single-task1", **env), device="scripted",  # type: ignore[arg-type]
                       out=str(out), realtime=False, time_scale=1000.0, oracle="plan", oracle_noise=0.1,
                       outcomes=outcomes, end_after=end_after, max_steps=100, operator="tester", status=False)
    assert run_teleop(cfg) == 0
    return out


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 successes (the env ends them at the goal) and 16 failures (the operator presses
    'failure' after 40 steps, with the cube still on its way): 32 labelled episodes."""
    return _record(tmp_path_factory.mktemp("reward") / "demos.hdf5", ["auto", "failure"] * (EPISODES // 2), 40)


def _cfg(paths: list[str], out: Path, **kw: object) -> RewardConfig:
    base = RewardConfig(paths=paths, out=str(out), hidden_dims=[64, 64], obs_noise=0.3, steps=800, threads=1,
                        progress=False)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(demos: Path, tmp_path_factory: pytest.TempPathFactory):
    return train_and_export(_cfg([str(demos)], tmp_path_factory.mktemp("out") / "reward.onnx"))


def test_frame_labels_follow_the_episode_verdict():
    np.testing.assert_array_equal(frame_labels(8, True, 2, 3), [0, 0, 0, -1, -1, -1, 1, 1])
    np.testing.assert_array_equal(frame_labels(8, False, 2, 3), [0] * 8)
    np.testing.assert_array_equal(frame_labels(3, True, 2, 3), [-1, 1, 1])


def test_hard_negatives_are_the_last_frames_of_each_failure_and_only_those(trained):
    result, _ = trained
    frames = result.frames
    hard = hard_negatives(frames, result.train, 4)
    failures = [e for e in result.train if not frames.success[e]]
    assert len(hard) == 4 * len(failures)
    for e in result.train:  # every hard negative ends a failure; a success contributes none
        rows = frames.rows(np.array([e]))
        picked = np.intersect1d(hard, rows)
        np.testing.assert_array_equal(picked, rows[-4:] if not frames.success[e] else rows[:0])
    assert (frames.labels[hard] == NEGATIVE).all()


def test_training_reaches_the_stated_held_out_f1(trained, demos):
    result, path = trained
    m = json.loads(metrics_path(path).read_text())
    split = m["split"]
    assert split["train_episodes"] + split["valid_episodes"] == EPISODES
    assert split["valid_episodes"] == 8 and split["valid_successes"] == 4  # a quarter of each label held out
    # held out by episode: no held-out episode's frame was trained on
    train_names = {result.frames.names[i] for i in result.train}
    assert not train_names & set(split["valid_names"])
    with h5py.File(demos) as f:  # the labels the metrics used are the file's verdicts
        for name in split["valid_names"]:
            e = result.frames.names.index(name)
            assert bool(result.frames.success[e]) == (f["data"][name.split(":")[1]].attrs["label"] == "success")
    frame, episode = m["valid"]["frame"], m["valid"]["episode"]
    assert frame["f1"] >= FRAME_F1, frame
    assert episode["f1"] >= EPISODE_F1 and episode["fpr"] <= 0.25, episode
    assert frame["tp"] + frame["fn"] == 4 * 5  # 5 positive frames per held-out success
    assert episode["tp"] + episode["fn"] == 4 and episode["fp"] + episode["tn"] == 4


def test_exported_detector_describes_itself_and_matches_torch(trained):
    result, path = trained
    det = SuccessDetector.load(path)
    meta = det.meta
    assert [(f.key, f.shape) for f in meta.obs_fields] == [("state", (28,))]
    assert (meta.threshold, meta.debounce, meta.task, meta.control_hz) == (0.5, 3, "cube-single-task1", 20.0)
    assert (meta.positive_frames, meta.gap_frames) == (5, 5)
    assert meta.metrics["valid"] == json.loads(metrics_path(path).read_text())["valid"]
    assert meta.config["steps"] == 800
    fr = result.frames
    for e in result.valid:  # each held-out episode through the runtime, step by step, as on the robot
        rows = np.flatnonzero(fr.episode == e)
        det.reset()
        decisions = [det.update({"state": fr.state[r].astype(np.float64)}) for r in rows]
        got = np.array([d.probability for d in decisions])
        with torch.no_grad():
            want = result.net(torch.from_numpy(fr.state[rows])).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        fired = next((i for i, d in enumerate(decisions) if d.fired), None)
        assert fired == first_fire(want, 0.5, 3)
        assert (fired is not None) == bool(fr.success[e])  # the stated F1 of 1.0 per episode here


def test_detector_spec_checks_against_the_sim_driver(trained):
    from qc_robot.drivers.registry import make_safe_driver
    from qc_robot.drivers.sim import SimConfig

    _, path = trained
    det = SuccessDetector.load(path)
    sim = make_safe_driver("sim", SimConfig(env="cube-single-task1", realtime=False))
    try:
        det.check_spec(sim.spec.obs_fields)  # the robot it was recorded on
    finally:
        sim.close()
    other = make_safe_driver("sim", SimConfig(env="cube-double-task1", realtime=False))
    try:
        with pytest.raises(ValueError, match=r"'state' is \[\d+\], the detector reads \[28\]"):
            det.check_spec(other.spec.obs_fields)
    finally:
        other.close()


def test_cli_writes_the_detector_and_metrics_and_prints_them(demos, tmp_path, capsys):
    from qc_robot.cli import main

    out = tmp_path / "policy_dir" / "reward.onnx"
    assert main(["reward", str(demos), f"out={out}", "steps=50", "hidden_dims=[16]", "threads=1",
                 "progress=false", "threshold=0.6", "debounce=2", "valid_fraction=0.5"]) == 0
    text = capsys.readouterr().out
    assert "held-out frames: precision" in text and "held-out episodes: precision" in text
    m = json.loads((tmp_path / "policy_dir" / "reward.metrics.json").read_text())
    assert m["split"]["valid_episodes"] == 16 and m["threshold"] == 0.6
    assert SuccessDetector.load(out).debounce == 2


@pytest.mark.parametrize("argv,needle", [
    (["reward"], "no episode files"),
    (["reward", "/nonexistent/demos.hdf5"], "/nonexistent/demos.hdf5 not found"),
])
def test_cli_mistakes_are_one_line(capsys, argv, needle):
    from qc_robot.cli import main

    assert main(argv) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines


def test_unlabelled_and_one_class_files_are_refused(tmp_path):
    from qc_robot.data.hdf5_io import DatasetError, EpisodeWriter
    from qc_robot.reward.data import load_labelled

    path = tmp_path / "plain.hdf5"
    with EpisodeWriter(path, {"task": "x"}) as w:  # a file without verdicts (e.g. datagen play data)
        obs = {"state": np.zeros((4, 3), np.float32)}
        w.add_episode(obs, np.zeros((4, 2)), np.zeros(4), np.zeros(4), obs)
    with pytest.raises(DatasetError, match="no episode carries a 'label'"):
        load_labelled([str(path)], None, 5, 5)


@pytest.mark.usefixtures("offscreen_gl")
def test_camera_images_train_through_the_image_encoder_and_export(tmp_path):
    """A few short rendered episodes: the image path end to end (no quality claim at this size)."""
    demos = _record(tmp_path / "img.hdf5", ["success", "failure"] * 3, 6, image_size=16, render_fast=True)
    cfg = _cfg([str(demos)], tmp_path / "img.onnx", obs_keys=["state", "image"], positive_frames=2, gap_frames=0,
               steps=20, batch_size=16, channels=[4], image_dim=8, valid_fraction=0.34)
    result, path = train_and_export(cfg)
    det = SuccessDetector.load(path)
    assert [f.key for f in det.meta.image_fields] == ["image"] and det.meta.obs_dim == 28
    fr = result.frames
    rows = fr.rows(result.valid)
    with torch.no_grad():
        want = result.net(torch.from_numpy(fr.state[rows]), torch.from_numpy(fr.images["image"][rows])).numpy()
    det.reset()
    got = [det.update({"state": fr.state[r], "image": fr.images["image"][r]}).probability for r in rows]
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="image 'image' is uint8 \\(8, 8, 3\\)"):
        det.update({"state": fr.state[0], "image": np.zeros((8, 8, 3), np.uint8)})
    from qc_robot.policies.base import ObsField

    with pytest.raises(ValueError, match="'image' is \\[32, 32, 3\\]"):
        det.check_spec([ObsField("state", (28,)), ObsField("image", (32, 32, 3), "uint8")])
    assert set(np.unique(fr.labels)) <= {POSITIVE, NEGATIVE, IGNORED}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 more episodes on other seeds than ``demos``: what a detector is checked on."""
    out = tmp_path_factory.mktemp("fresh") / "today.hdf5"
    cfg = TeleopConfig(driver="sim", env=EnvConfig(name="cube-single-task1"), device="scripted", out=str(out),
                       realtime=False, time_scale=1000.0, oracle="plan", oracle_noise=0.1,
                       outcomes=["auto", "failure"] * 6, end_after=40, max_steps=100, operator="tester",
                       status=False, seed=777)
    assert run_teleop(cfg) == 0
    return out


def test_check_measures_the_exported_file_as_the_robot_runs_it(trained, fresh, tmp_path, capsys):
    """``reward check=``: the batched rates equal what the runtime decides frame by frame."""
    from qc_robot.cli import main
    from qc_robot.reward.data import load_labelled

    _, path = trained
    report = tmp_path / "check.json"
    assert main(["reward", str(fresh), f"check={path}", f"report={report}"]) == 0
    text = capsys.readouterr().out
    assert "episodes: precision" in text and "95% upper bound" in text and "not held out" not in text
    r = json.loads(report.read_text())
    det = SuccessDetector.load(path)
    frames = load_labelled([str(fresh)], ["state"], 5, 5)
    def robot(det: SuccessDetector) -> tuple[list[bool], int]:
        """Fired per episode, and successes it fired on before their gap and positives began."""
        fired, early = [], 0
        for e in range(frames.num_episodes):  # the robot's loop: reset, then one update per frame
            det.reset()
            decisions = [det.update({"state": s}) for s in frames.state[frames.episode == e]]
            fired.append(decisions[-1].fired)
            at, labels = decisions[-1].fired_at, frames.labels[frames.episode == e]
            early += bool(frames.success[e] and at is not None and at < int(np.argmax(labels != NEGATIVE)))
        return fired, early

    fired, early = robot(det)
    fired_a, ok = np.array(fired), frames.success
    ep = r["episode"]
    assert (r["episodes"], r["successes"]) == (12, int(ok.sum()))
    assert (ep["tp"], ep["fp"], ep["fn"], ep["tn"]) == (
        int((fired_a & ok).sum()), int((fired_a & ~ok).sum()), int((~fired_a & ok).sum()), int((~fired_a & ~ok).sum()))
    sweep = {s["threshold"]: s for s in r["episode_sweep"]}
    assert ep["early_fires"] == early  # a success it would have ended before it happened
    assert sweep[0.5]["fp"] == ep["fp"] and sweep[0.5]["tp"] == ep["tp"]  # the stored threshold is 0.5
    early_by_threshold = {t: robot(SuccessDetector.load(path, threshold=t))[1] for t in sweep}
    assert {t: s["early_fires"] for t, s in sweep.items()} == early_by_threshold

    # a detector that says yes from the first frame ends every success early: check counts each
    from qc_robot.policies.success_detector import DetectorMetadata
    from qc_robot.reward.export import export_detector
    from qc_robot.reward.model import DetectorNet

    net = DetectorNet(det.meta.obs_dim, {}, hidden=[])
    with torch.no_grad():
        net.head.net[0].weight.zero_()
        net.head.net[0].bias.fill_(10.0)
    always, _ = export_detector(net, DetectorMetadata(obs_fields=det.meta.obs_fields, positive_frames=5, gap_frames=5),
                                tmp_path / "always.onnx", frames.state[:2], {})
    assert main(["reward", str(fresh), f"check={always}", f"report={report}"]) == 0
    fired, early = robot(SuccessDetector.load(always))
    assert early == int(ok.sum()) > 0 and json.loads(report.read_text())["episode"]["early_fires"] == early
    assert all(a["tp"] >= b["tp"] and a["fp"] >= b["fp"]  # a higher threshold never fires more
               for a, b in itertools.pairwise(r["episode_sweep"]))
    assert ep["fpr_upper95"] >= ep["fpr"]


def test_check_says_when_the_episodes_are_not_held_out(trained, demos, capsys):
    from qc_robot.cli import main

    _, path = trained
    assert main(["reward", str(demos), f"check={path}"]) == 0
    assert "these rates are not held out" in capsys.readouterr().out


def test_check_refuses_a_missing_detector_in_one_line(fresh, capsys):
    from qc_robot.cli import main

    assert main(["reward", str(fresh), "check=/nonexistent/reward.onnx"]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "/nonexistent/reward.onnx not found" in lines[0], lines


def test_false_positive_bound_is_clopper_pearson():
    from qc_robot.reward.check import binomial_upper

    assert binomial_upper(0, 0) is None and binomial_upper(5, 5) == 1.0
    assert binomial_upper(0, 103) == pytest.approx(1 - 0.05 ** (1 / 103), rel=1e-6)  # closed form at k = 0
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(1, 20), (3, 104), (12, 900)]:
        assert binomial_upper(k, n) == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), rel=1e-6)
