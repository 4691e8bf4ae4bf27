"""Issue 29: evaluation on Ray actors (``workers=N``), the same results as the sequential run
with the policy's noise restarted per episode; a killed worker's episode rerun once and counted once. Real Ray (a local instance
of 2 CPUs), real MuJoCo, real files. Without ray installed (the ``cluster`` extra) the Ray tests
skip and the one-line refusal is tested instead."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_rig import DieOnce, ship_by_value

from qc_robot.cli import main

EVAL = ["episodes=4", "env.max_episode_steps=10", "progress=false", "seed=7"]


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    from qc_robot.train.learner import CHECKPOINT

    run = tmp_path_factory.mktemp("run")
    assert main(["train", "experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                 "training.offline_steps=2", "training.online_steps=0", "training.eval_episodes=0"]) == 0
    return run / CHECKPOINT


def _summary(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ": success " in ln]


def test_workers_without_ray_is_one_line_naming_the_extra(checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # find_spec('ray') is None: as if not installed
    for argv in (["eval", f"checkpoint={checkpoint}", "workers=2", *EVAL], ["fleet", "robots=2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "=2 runs" in err[0] and 'qc-robot[cluster]' in err[0], err


def test_bad_worker_counts_are_refused(checkpoint, capsys):
    assert main(["eval", f"checkpoint={checkpoint}", "workers=0", *EVAL]) == 2
    assert main(["eval", f"checkpoint={checkpoint}", "workers=2", "video=v.gif", *EVAL]) == 2
    assert main(["fleet", "driver=xarm"]) == 2
    assert main(["fleet", "robots=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "workers=0" in err[0] and "workers=1" in err[1], err
    assert "sim or mock" in err[2] and "robots >= 1" in err[3], err


def test_one_worker_never_imports_ray(checkpoint, tmp_path):
    code = ("import sys; from qc_robot.cli import main; "
            f"rc = main(['eval', 'checkpoint={checkpoint}', 'workers=1', 'out={tmp_path / 'e.csv'}', *{EVAL!r}]); "
            "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=600)
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 1 + 4


def test_eval_on_two_workers_equals_the_sequential_eval(checkpoint, tmp_path, capsys):
    pytest.importorskip("ray")
    seq, par = tmp_path / "seq.csv", tmp_path / "par.csv"
    assert main(["eval", f"checkpoint={checkpoint}", f"out={seq}", "per_episode_noise=true", *EVAL]) == 0
    out_seq = capsys.readouterr().out
    assert main(["eval", f"checkpoint={checkpoint}", f"out={par}", "workers=2", *EVAL]) == 0
    out_par = capsys.readouterr().out
    rows = list(csv.DictReader(seq.open()))
    assert [int(r["episode"]) for r in rows] == [0, 1, 2, 3] and [int(r["seed"]) for r in rows] == [7, 8, 9, 10]
    assert len({r["final_obs_crc"] for r in rows}) == 4  # the episodes differ: a reorder would show
    assert par.read_text() == seq.read_text()
    assert _summary(out_par) == _summary(out_seq) and len(_summary(out_seq)) == 1


@dataclass(frozen=True)
class CountRuns:
    """Task i returns i and appends a line to ``log`` per run (to count the runs per task)."""

    log: str

    def __call__(self):
        def task(i: int) -> int:
            with open(self.log, "a") as f:
                f.write(f"{i}\n")
            return i

        return task


@dataclass(frozen=True)
class AlwaysDies:
    def __call__(self):
        def task(i: int) -> int:
            os._exit(1)

        return task


def _by_value(ray) -> None:
    ship_by_value(ray, __name__)


def test_a_killed_workers_episode_is_rerun_and_counted_once(checkpoint, tmp_path, ray_local):
    from qc_robot.ray_pool import run_tasks
    from qc_robot.train.checkpoint import load_checkpoint
    from qc_robot.train.evaluate import CheckpointEpisodes, agent_policy, evaluate

    _by_value(ray_local)
    n, seed = 5, 3
    env = load_checkpoint(checkpoint).config.env
    job = CheckpointEpisodes(str(checkpoint), env.name, seed, env.sparse_reward, 10)
    marker = tmp_path / "died"
    got = run_tasks(DieOnce(job, victim=1, marker=str(marker)), n, 2)
    assert marker.is_file()  # a worker did die mid-run
    want = evaluate(agent_policy(load_checkpoint(checkpoint).agent, seed), env.name, n, seed,
                    env.sparse_reward, 10, restart_noise=True).outcomes
    assert [o.episode for o in got] == list(range(n))  # every episode exactly once, in order
    assert got == want


def test_each_task_runs_once_unless_its_worker_dies(tmp_path, ray_local):
    from qc_robot.ray_pool import run_tasks

    _by_value(ray_local)
    log = tmp_path / "runs.txt"
    assert run_tasks(CountRuns(str(log)), 7, 2) == list(range(7))
    assert sorted(int(x) for x in log.read_text().split()) == list(range(7))


def test_a_task_that_always_kills_its_worker_gives_up(ray_local):
    from qc_robot.ray_pool import WorkerLost, run_tasks

    _by_value(ray_local)
    with pytest.raises(WorkerLost, match="task 0 lost its worker 2 times"):
        run_tasks(AlwaysDies(), 1, 1, max_retries=1)


@dataclass(frozen=True)
class DriveDiesOnce:
    """``drive`` for a fleet robot: the first time robot 0 runs, it drives one episode without
    waiting for its acknowledgements and its process exits (as a crash would)."""

    marker: str

    def __call__(self, cfg):
        from dataclasses import replace

        from qc_robot.drivers.drive import run_drive

        if cfg.outbox_dir.endswith("robot0") and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            run_drive(replace(cfg, episodes=1, outbox_drain_s=0.0))
            os._exit(1)
        return run_drive(cfg)


def test_a_fleet_restarts_a_dead_robot_on_its_outbox(tmp_path, ray_local, capsys):
    """Two sim robots against one real server; robot 0's process dies after its first episode and
    is restarted on the same outbox: it runs only the episode it still owes, under the next episode
    id, and every transition of both episodes is numbered once and acknowledged."""
    from qc_robot.cli import compose
    from qc_robot.fleet import run_fleet
    from qc_robot.server.app import ControlServer
    from qc_robot.server.serve import load_policy

    _by_value(ray_local)
    srv = ControlServer(load_policy("default"), "tcp://127.0.0.1:*").start()
    try:
        cfg = compose("fleet", ["robots=2", "episodes=2", "realtime=false", "max_steps=20", f"server={srv.address}",
                                f"fleet_dir={tmp_path / 'fleet'}"])
        marker = tmp_path / "died"
        assert run_fleet(cfg, DriveDiesOnce(str(marker))) == 0
    finally:
        srv.stop()
    out = capsys.readouterr().out
    assert marker.is_file() and "robot 0 died; restart 1/3" in out and "robot 1 done (exit 0, restarts 0)" in out
    for k in (0, 1):
        box = tmp_path / "fleet" / f"robot{k}"
        assert (box / "episode").read_text() == "1"  # episodes 0 and 1 begun, no third
        assert int((box / "acked").read_text()) == 2 * 20 // 5  # one transition per chunk, each once
    assert srv.stats.transitions >= 2 * 2 * 20 // 5
