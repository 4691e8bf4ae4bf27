"""The learner loop: exact resume, offline→online in sim, checkpoints and run logs, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from qc_robot.cli import compose, main
from qc_robot.config import TrainConfig
from qc_robot.train.checkpoint import load_checkpoint
from qc_robot.train.learner import CHECKPOINT, Learner, train


def _cfg(dataset: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    cfg = compose("train", ["experiment=smoke", f"data.path={dataset}", f"training.run_dir={run_dir}",
                            "training.eval_episodes=0", *overrides])
    assert isinstance(cfg, TrainConfig)
    return cfg


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / CHECKPOINT).agent.state_dict()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_train_two_steps_then_resume_is_bit_exact(tiny_dataset, tmp_path):
    straight = train(_cfg(tiny_dataset, tmp_path / "a", "training.offline_steps=4", "training.online_steps=0"))
    assert straight.step == 4
    train(_cfg(tiny_dataset, tmp_path / "b", "training.offline_steps=2", "training.online_steps=0"))
    resumed = train(_cfg(tiny_dataset, tmp_path / "b", "training.offline_steps=4", "training.online_steps=0",
                         "training.resume=true"))
    assert resumed.step == 4
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    _assert_same_state({k: v for k, v in a.items() if k != "rng"}, {k: v for k, v in b.items() if k != "rng"})
    # and the runs did change the weights (the comparison above is not vacuous)
    fresh = train(_cfg(tiny_dataset, tmp_path / "c", "training.offline_steps=1", "training.online_steps=0"))
    assert fresh.step == 1
    c = _params(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a if isinstance(a[k], torch.Tensor) and a[k].is_floating_point())


def test_offline_then_online_appends_and_acts_once_per_chunk(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "training.offline_steps=6", "training.online_steps=25",
               "training.eval_episodes=1", "env.max_episode_steps=12", "training.log_interval=5")
    learner = Learner(cfg)
    offline_rows = learner.replay.size
    calls = []
    act = learner.agent.act
    learner.agent.act = lambda obs, **kw: calls.append(1) or act(obs, **kw)  # count policy queries
    result = learner.run()
    assert result.env_steps == 25
    assert learner.replay.size == offline_rows + 25
    assert learner.replay.keep == offline_rows  # offline data kept in the replay
    assert cfg.agent.horizon == 5
    # Episodes of 12 steps = 5 + 5 + 2: 3 queries each. Online: 25 steps = 12 + 12 + 1 → 7 queries;
    # plus two 1-episode evaluations (end of offline, end of online) → 6 more.
    assert len(calls) == 7 + 6
    assert result.step == 6 + 25 * cfg.training.utd
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert rows and "critic/loss" in rows[0]
    evals = list(csv.DictReader((tmp_path / "run" / "eval.csv").open()))
    assert [e["phase"] for e in evals] == ["offline", "online"]
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert ckpt.step == result.step and ckpt.env_steps == 25
    assert ckpt.versions["torch"] == torch.__version__


def test_cli_train_then_eval(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "cli"
    assert main(["train", "experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                 "training.online_steps=0", "training.eval_episodes=0"]) == 0
    assert main(["eval", f"--checkpoint={run / CHECKPOINT}", "episodes=1", "env.max_episode_steps=10",
                 "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "cube-single-task1: success" in out and "over 1 episodes" in out
    # what it evaluates, at the start and in the summary, in the words drive uses for the export
    ckpt = load_checkpoint(run / CHECKPOINT)
    lines = out.splitlines()
    label = (f"{run / CHECKPOINT}, a model ({ckpt.agent.cfg.actor_type}, task cube-single-task1, "
             f"version step{ckpt.step}-{ckpt.config_hash[:8]})")
    start = [i for i, ln in enumerate(lines) if ln.startswith(f"eval: {label}, config {ckpt.config_hash}")]
    summary = [i for i, ln in enumerate(lines) if ln.startswith("cube-single-task1: success")]
    assert start and summary and start[0] < summary[0], out
    assert f"policy: {label}" in lines[summary[0] + 1:], out


def test_cli_rejects_unknown_keys_and_missing_data(tmp_path, capsys):
    assert main(["train", "agent.not_a_field=3"]) == 2
    assert "not_a_field" in capsys.readouterr().err
    assert main(["train", f"data.path={tmp_path / 'none.hdf5'}", "training.offline_steps=5"]) == 2
    shown = capsys.readouterr()
    assert "qc-robot datagen" in shown.out + shown.err
