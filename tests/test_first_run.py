"""First run after install: bring-up policies, the mock driver's own episode length and sizing,
the shipped default policy served with no --policy (issue 15)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qc_robot.cli import compose, main
from qc_robot.drivers.mock import MockConfig, MockDriver, policy_dims

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def hold_server():
    """A real control server on a free loopback port, serving a bring-up policy."""
    from qc_robot.server.app import ControlServer
    from qc_robot.server.serve import load_policy

    made = []

    def start(ref: str) -> ControlServer:
        s = ControlServer(load_policy(ref), "tcp://127.0.0.1:*").start()
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


def test_mock_keeps_its_own_episode_length_under_drive(hold_server, capsys):
    """drive passes env.max_episode_steps=0 ('unset'); the mock's episodes still end at 100."""
    srv = hold_server("hold:28:5:5")
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=2", "driver_args.obs_dim=28"]) == 0
    out = capsys.readouterr().out
    assert out.count("steps 100 (robot 100)") == 2 and "success 0/2" in out
    assert srv.stats.chunks == 2 * 100 // 5


def test_mock_takes_its_dimensions_from_a_policy_when_asked(hold_server, capsys):
    srv = hold_server("random:28:5:5:10")
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=1",
                 "driver_args.policy=random:28:5:5:10", "driver_args.max_episode_steps=20"]) == 0
    assert "steps 20 (robot 20)" in capsys.readouterr().out
    d = MockDriver(MockConfig(policy="hold:28:7:5:10"))
    assert d.spec.action_dim == 7 and d.spec.obs_fields[0].shape == (28,) and d.spec.control_hz == 10.0
    assert d.reset(0)["state"].shape == (28,)


def test_a_mismatched_mock_is_refused_by_the_server(hold_server, capsys):
    srv = hold_server("hold:28:5:5")
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=1", "connect_timeout_s=5"]) != 0
    assert "spec_mismatch" in capsys.readouterr().out


def test_bring_up_refs_give_their_spec():
    assert policy_dims("hold:37:5:5") == (5, 37, 20.0)
    with pytest.raises(ValueError, match="hold:OBS_DIM"):
        policy_dims("hold:x")


def test_serve_needs_no_policy_key():
    assert compose("serve", []).policy == "default"
    assert compose("drive", []).env.name == "cube-single-task1"  # the shipped policy's task


def test_mock_max_episode_steps_zero_means_its_default():
    d = MockDriver(MockConfig(max_episode_steps=0, success_radius=0.0))
    d.reset(0)
    ends = []
    for _ in range(100):
        d.send_action(np.zeros(5))
        ends.append(d.step_info().truncated)
    assert d.spec.max_episode_steps == 100 and ends == [False] * 99 + [True]


def test_demo_runs_the_whole_loop_and_summarises(capsys):
    """Server + sim driver over real ZeroMQ, lockstep, two short episodes, with a bring-up policy."""
    assert main(["demo", "policy=hold:28:5:5", "episodes=2", "realtime=false", "env.max_episode_steps=20"]) == 0
    out = capsys.readouterr().out
    assert "episode 1/2: failure after 20 steps" in out and "episode 2/2" in out
    assert "summary: success 0/2" in out and "chunks served     8 (errors: none)" in out


def test_demo_refuses_a_policy_that_does_not_fit_the_task(capsys):
    rc = main(["demo", "policy=hold:37:5:5", "episodes=1", "realtime=false"])
    err = capsys.readouterr().err
    assert rc != 0 and "spec_mismatch" in err and len(err.strip().splitlines()) == 1


_PROBE = "from qc_robot.video import use_offscreen_gl; use_offscreen_gl(); import mujoco; mujoco.GLContext(8, 8).free()"


def test_drive_writes_a_gif_of_the_sim(tmp_path, hold_server):
    """A tiny rollout video (3 frames): MuJoCo's offscreen renderer through the sim driver, in a
    fresh process (MuJoCo picks its GL backend when first imported). QC_ROBOT_SKIP_RENDER=1 skips."""
    import os
    import subprocess
    import sys

    from PIL import Image

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if os.environ.get("QC_ROBOT_SKIP_RENDER") or subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no offscreen GL context (EGL/OSMesa) here")
    srv = hold_server("hold:28:5:5")
    gif = tmp_path / "rollout.gif"
    out = subprocess.run([sys.executable, "-m", "qc_robot.cli", "drive", "driver=sim", f"server={srv.address}",
                          "episodes=1", "realtime=false", "env.max_episode_steps=4", f"video={gif}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"video of the first 1 episode(s): {gif}" in out.stdout
    im = Image.open(gif)
    assert im.size == (200, 200) and im.n_frames >= 2  # reset + steps 2, 4 (identical frames may merge)
    frame = np.asarray(im.convert("RGB"))
    assert frame.std() > 5  # a rendered scene, not a blank frame


def test_train_multirun_gives_each_job_its_own_directory(tmp_path, tiny_dataset, monkeypatch):
    """`train -m training.seed=0,1`: Hydra's sweeper and basic launcher, one run directory per job."""
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "-m", "experiment=smoke", "training.seed=0,1", f"data.path={tiny_dataset}",
               "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"])
    assert rc == 0
    jobs = sorted(p for p in (tmp_path / "runs" / "sweep" / "train").glob("*/*") if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for i, job in enumerate(jobs):
        assert (job / "checkpoint.pt").is_file()
        assert f"training.seed={i}" in (job / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_train_multirun_with_the_joblib_launcher(tmp_path, tiny_dataset, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=smoke",
               "training.seed=0,1", f"data.path={tiny_dataset}", "training.offline_steps=2",
               "training.online_steps=0", "training.eval_episodes=0"])
    assert rc == 0
    assert len(list((tmp_path / "runs" / "sweep" / "train").glob("*/*/checkpoint.pt"))) == 2


def test_serve_without_a_policy_serves_the_shipped_one():
    from qc_robot.server.serve import load_policy

    policy = load_policy("default")
    assert [(f.key, f.shape) for f in policy.spec.obs_fields] == [("state", (28,))]  # cube-single-task1
    assert policy.spec.action_dim == 5 and policy.spec.chunk_len == 5 and policy.spec.actor_type == "fql"


def test_serve_without_a_policy_is_one_line_when_none_is_shipped(capsys, monkeypatch, tmp_path):
    import qc_robot.assets

    monkeypatch.setattr(qc_robot.assets, "default_policy_path", lambda: tmp_path / "cube-single-task1.onnx")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ships no default policy" in err[0] and "policy=hold:28:5:5" in err[0]


def test_drive_records_a_live_view_of_the_loop_for_rerun(tmp_path, hold_server, capsys):
    """viz=FILE.rrd: one row per executed step of obs, action, chunk seam; one rtt per chunk."""
    chunk_api = pytest.importorskip("rerun.chunk")
    if not hasattr(chunk_api, "RrdReader"):
        pytest.skip("this rerun-sdk cannot read recordings back")
    srv = hold_server("hold:28:5:5")
    rrd = tmp_path / "loop.rrd"
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=2", "driver_args.obs_dim=28",
                 "driver_args.max_episode_steps=30", f"viz={rrd}"]) == 0
    capsys.readouterr()
    values: dict[str, list[float]] = {}
    for ch in chunk_api.RrdReader(rrd).store().stream().to_chunks():
        path = str(ch.entity_path)
        if path in ("/action", "/chunk/seam", "/latency/rtt_ms", "/obs/state"):
            col = ch.to_record_batch().column("Scalars:scalars").to_pylist()
            values.setdefault(path, []).extend(col)
    assert len(values["/action"]) == len(values["/obs/state"]) == 60  # 2 episodes x 30 steps
    assert all(len(v) == 5 for v in values["/action"]) and all(len(v) == 28 for v in values["/obs/state"])
    assert sum(v[0] for v in values["/chunk/seam"]) == 12 == len(values["/latency/rtt_ms"])  # H = 5


@pytest.mark.slow
def test_demo_fine_tunes_online_and_swaps_pushed_policies(tmp_path, tiny_dataset, capsys):
    """demo finetune=CKPT: export, learner port, a `qc-robot finetune` process on the driver's
    transitions, pushed policies swapped in (about a minute: each push exports and verifies)."""
    run = tmp_path / "smoke"
    assert main(["train", "experiment=smoke", "agent=qc_fql", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                 "training.online_steps=0", "training.eval_episodes=0"]) == 0
    capsys.readouterr()
    assert main(["demo", f"finetune={run / 'checkpoint.pt'}", "episodes=2", "realtime=false",
                 "env.max_episode_steps=30", "push_every=20", f"finetune_dir={tmp_path / 'ft'}"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("fine-tune"))
    assert "12 transitions streamed" in line  # 2 episodes x 30 steps, in chunks of 5
    assert "policy v0 → v" in line and not line.split("→ v")[1].startswith("0")
    assert "60 env steps" in (tmp_path / "ft" / "finetune.log").read_text()
