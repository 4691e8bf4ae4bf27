"""The operator in the loop of ``drive`` (issue: fine-tuning on a real arm, part 1).

Everything runs over real sockets: a control server with its transition journal, the blind
lockstep MuJoCo sim as the robot, and either the scripted operator (OGBench's oracle playing the
human) or a scripted key device standing in for a person at a keyboard. What the server journaled
is read back from the journal's files, decoded as the learner decodes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_finetune_loop import ft_cfg

from qc_robot.cli import compose
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.drive import build_driver, run_drive
from qc_robot.drivers.episode_stage import EpisodeStage
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.runner import run_episode
from qc_robot.finetune.client import _record
from qc_robot.server.app import ControlServer
from qc_robot.server.episode_log import EpisodeLogger
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink
from qc_robot.server.serve import load_policy
from qc_robot.teleop.devices import Event, TeleopCommand, TeleopDevice
from qc_robot.teleop.operator import Operator
from qc_robot.teleop.supervisor import ScriptedSupervisor

TASK = "cube-single-task1"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlServer, Journal]]:
    """The shipped policy, its noise seeded so that its outcomes repeat, served with a transition
    journal (the learner port is bound, unused) and an episode log."""
    journal = Journal(str(tmp_path / "journal"))
    link = LearnerLink(f"ipc://{tmp_path / 'learner.ipc'}", journal)
    srv = ControlServer(load_policy("default", seed=0), "tcp://127.0.0.1:*", learner_link=link,
                        episode_logger=EpisodeLogger(str(tmp_path / "episodes"), {"source": "test"})).start()
    yield srv, journal
    srv.stop()


def journaled(journal: Journal) -> list[Any]:
    """Every transition the server journaled, as the learner decodes them."""
    return [_record(raw).transition for raw in journal.read(1, max_records=100_000)]


def by_episode(trs: list[Any]) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, list[np.ndarray]]] = {}
    for tr in trs:
        ep = out.setdefault(tr.episode_id, {k: [] for k in ("rewards", "terminals", "truncated", "intervention",
                                                            "actions", "held", "success")})
        for k in ("rewards", "terminals", "truncated", "intervention", "actions", "held"):
            ep[k].append(getattr(tr, k))
        ep["success"].append(np.full(len(tr.actions), tr.success))
    return {e: {k: np.concatenate(v) for k, v in d.items()} for e, d in out.items()}


class Recorded(ScriptedSupervisor):
    """The scripted operator, also noting what it said at every tick of every episode."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.ticks: list[list[tuple[bool, np.ndarray | None]]] = []

    def episode_started(self, obs: Any) -> None:
        super().episode_started(obs)
        self.ticks.append([])

    def read(self) -> TeleopCommand:
        cmd = super().read()
        if self._in_episode and not cmd.events:
            self.ticks[-1].append((bool(cmd.takeover), None if cmd.action is None else cmd.action.copy()))
        return cmd


def drive_cfg(address: str, tmp_path: Path, *extra: str) -> Any:
    return compose("drive", [f"server={address}", f"env={TASK}", "driver=sim", "realtime=false", "blind=true",
                             "episodes=2", "seed=3", f"outbox_dir={tmp_path / 'outbox'}", "outbox_drain_s=60",
                             *extra])


@pytest.fixture(scope="module")
def sparse_ckpt(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-update offline checkpoint trained on sparse rewards (the convention of verdict rewards)."""
    from qc_robot.train.learner import train

    run = tmp_path_factory.mktemp("sparse")
    train(compose("train", ["experiment=smoke", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                            "env.sparse_reward=true", "training.offline_steps=2", "training.online_steps=0",
                            "training.eval_episodes=0"]))
    return run / "checkpoint.pt"


def test_takeover_steps_are_flagged_exactly_and_reach_the_learners_intervention_buffer(server, tmp_path, sparse_ckpt):
    srv, journal = server
    cfg = drive_cfg(srv.address, tmp_path, "max_steps=60")
    driver = build_driver(cfg)
    from qc_robot.teleop.operator import OperatorConfig

    sup = Recorded.for_driver(driver, OperatorConfig(patience=5, takeover_steps=12, max_takeovers=2, noise=0.0))
    operator = Operator(sup)
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("sim"), outbox=None)
    welcome = client.connect(10.0)
    ex = ChunkExecutor(client, welcome.chunk_len, "open_loop", wait_when_empty=True)
    results = [run_episode(driver, ex, i, 40 + i, None, client, send_transitions=True, max_steps=60,
                           operator=operator, stage=EpisodeStage(), verdict_rewards=True) for i in range(2)]
    client.close()
    driver.close()
    eps = by_episode(journaled_until(journal, sum(r.rows for r in results)))
    assert sorted(eps) == [0, 1]
    for i, r in enumerate(results):
        said = sup.ticks[i][: r.rows]
        want = np.array([t for t, _ in said])
        np.testing.assert_array_equal(eps[i]["intervention"], want)  # exactly the takeover ticks
        assert r.interventions == int(want.sum())
        for j, (t, a) in enumerate(said):  # the operator's command is what the robot executed
            if t and a is not None:
                np.testing.assert_allclose(eps[i]["actions"][j], np.clip(a, -1, 1), atol=1e-6)
    assert sum(int(e["intervention"].sum()) for e in eps.values()) > 0, "the scripted operator never took over"
    # the server's episode log keeps the flags and the rows' reward convention
    srv.stop()
    with h5py.File(srv.logger.path, "r") as f:
        logged = sorted((f[f"data/{d}"] for d in f["data"]), key=lambda g: int(g.attrs["episode_id"]))
        assert [int(g.attrs["episode_id"]) for g in logged] == [0, 1]
        for i, g in enumerate(logged):
            np.testing.assert_array_equal(g["intervention"][:].astype(bool), eps[i]["intervention"])
            np.testing.assert_array_equal(g["rewards"][:], eps[i]["rewards"])
            assert g.attrs["reward"] == "sparse"
    # the learner: takeover rows go to its intervention buffer
    from qc_robot.finetune.client import Record
    from qc_robot.finetune.loop import Finetuner

    ft = Finetuner(ft_cfg(sparse_ckpt, tmp_path / "ft"))  # verdict rewards are sparse: so is its checkpoint
    recs = [Record(k + 1, "s", "sim", "v0", 0.0, tr) for k, tr in enumerate(journaled(journal))]
    ft.apply(recs)
    assert ft.interventions.size >= sum(int(e["intervention"].sum()) for e in eps.values())


def journaled_until(journal: Journal, rows: int, attempts: int = 2000) -> list[Any]:
    """The journal's transitions once ``rows`` steps are in it (the server journals on its own
    thread; a bounded poll, never a sleep that assumes it is done)."""
    import threading

    ev = threading.Event()
    for _ in range(attempts):
        trs = journaled(journal)
        if sum(len(t.actions) for t in trs) >= rows:
            return trs
        ev.wait(0.01)
    raise AssertionError(f"the journal holds {sum(len(t.actions) for t in journaled(journal))} of {rows} rows")


def test_a_blind_sim_leaks_no_reward_or_success_and_verdicts_give_the_sparse_rewards(server, tmp_path):
    srv, journal = server
    # operator=none: the shipped policy solves cube-single in ~60 steps, and the blind sim must not say so
    cfg = drive_cfg(srv.address, tmp_path, "episodes=1", "max_steps=120")
    driver = build_driver(cfg)
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("sim"))
    client.connect(10.0)
    ex = ChunkExecutor(client, 5, "open_loop", wait_when_empty=True)
    hidden: list[bool] = []
    r = run_episode(driver, ex, 0, 5001, None, client, send_transitions=True, max_steps=120,
                    on_rows=lambda rows: hidden.append(driver.driver.hidden_info().success))
    client.close()
    driver.close()
    assert any(hidden), "the shipped policy should have solved seed 5001 (the check needs a success to hide)"
    ep = by_episode(journaled_until(journal, r.rows))[0]
    assert r.rows == 120 and not r.success
    assert not ep["rewards"].any() and not ep["success"].any() and not ep["terminals"].any()
    assert ep["truncated"][-1] and not ep["truncated"][:-1].any()


def test_the_scripted_operator_ends_blind_episodes_with_verdict_rewards_through_drive(server, tmp_path, capsys):
    srv, journal = server
    cfg = drive_cfg(srv.address, tmp_path, "operator=scripted", "max_steps=150", "seed=100")
    assert run_drive(cfg) == 0
    out = capsys.readouterr().out
    assert "operator scripted" in out and "rewards from verdicts" in out
    eps = by_episode(journaled(journal))  # drained: every row was acknowledged, so journaled
    assert sorted(eps) == [0, 1]
    for ep in eps.values():
        n = len(ep["rewards"])
        if ep["success"][-1]:
            np.testing.assert_array_equal(ep["rewards"], [-1.0] * (n - 1) + [0.0])
            assert ep["terminals"][-1] and not ep["terminals"][:-1].any()
        else:
            np.testing.assert_array_equal(ep["rewards"], -np.ones(n))
            assert ep["truncated"][-1] and not ep["terminals"].any()
    assert any(ep["success"][-1] for ep in eps.values()), out


class KeyScript(TeleopDevice):
    """A person at the keys, by script: ``script[(episode, tick)]`` is what they do at that tick of
    an episode (a list of events, 'takeover' to hold the controls with ``action``, 'raise' for a
    device that fails); ``reset_keys`` are pressed during each reset phase before ready."""

    name = "keys"

    def __init__(self, script: dict[tuple[int, int], list[Any]], action: np.ndarray,
                 reset_keys: list[Event] | None = None) -> None:
        self.script, self.action, self.reset_keys = script, action, list(reset_keys or [])
        self.episode, self.tick = -1, 0
        self.in_episode = False
        self.reset_ticks = 0

    def episode_started(self, obs: Any) -> None:
        self.episode, self.tick, self.in_episode = self.episode + 1, 0, True

    def episode_ended(self) -> None:
        self.in_episode, self.reset_ticks = False, 0

    def read(self) -> TeleopCommand:
        if not self.in_episode:
            self.reset_ticks += 1
            return TeleopCommand(None, self.reset_keys if self.reset_ticks == 1 else [Event.START])
        said = self.script.get((self.episode, self.tick), [])
        self.tick += 1
        if "raise" in said:
            raise OSError("device unplugged")
        events = [e for e in said if isinstance(e, Event)]
        return TeleopCommand(self.action.copy(), events, takeover="takeover" in said)


def run_keys(address: str, device: KeyScript, episodes: int, max_delta: float = 0.0) -> tuple[list[Any], Any]:
    cfg = compose("drive", [f"server={address}", "driver=mock", "driver_args.obs_dim=28", "driver_args.action_dim=5",
                            "driver_args.max_episode_steps=30"] + ([f"safety.max_delta=[{max_delta}]"] if max_delta else []))
    driver = build_driver(cfg)
    driver.connect()
    client = PolicyClient(address, driver.spec.hello("mock"))
    client.connect(10.0)
    ex = ChunkExecutor(client, 5, "open_loop", wait_when_empty=True)
    op = Operator(device)
    applied: list[np.ndarray] = []
    res = [run_episode(driver, ex, i, i, None, client, send_transitions=True, operator=op, stage=EpisodeStage(),
                       verdict_rewards=True, on_rows=lambda rows: applied.extend(r.action for r in rows))
           for i in range(episodes)]
    client.close()
    driver.close()
    return res, (op, applied)


def test_discards_are_never_sent_and_keys_during_a_reset_are_ignored_and_counted(server):
    srv, journal = server
    dev = KeyScript({(0, 6): [Event.DISCARD], (1, 8): [Event.SUCCESS], (2, 4): [Event.FAILURE]},
                    np.zeros(5, np.float32), reset_keys=[Event.SUCCESS, Event.PAUSE])
    res, (op, _) = run_keys(srv.address, dev, 3)
    assert [r.verdict for r in res] == ["discard", "success", "failure"]
    eps = by_episode(journaled_until(journal, 8 + 4))
    assert sorted(eps) == [1, 2]  # the discarded episode 0 never reached the server
    np.testing.assert_array_equal(eps[1]["rewards"], [-1.0] * 7 + [0.0])
    assert eps[1]["terminals"][-1] and eps[1]["success"][-1]
    np.testing.assert_array_equal(eps[2]["rewards"], [-1.0] * 4)
    assert eps[2]["truncated"][-1] and not eps[2]["terminals"].any()
    assert op.stats.ignored_during_reset == 3 * 2 and op.stats.verdicts == {"success": 1, "failure": 1, "discard": 1}


def test_a_device_failing_mid_takeover_holds_and_the_hand_back_stays_within_the_limits(server):
    srv, journal = server
    push = np.array([0.9, -0.9, 0.9, 0.0, 0.9], np.float32)  # far from the hold: the limit must bite
    script: dict[tuple[int, int], list[Any]] = {(0, t): ["takeover"] for t in range(3, 12)}
    for t in (6, 7, 8):
        script[(0, t)] = ["raise"]
    script[(0, 20)] = [Event.FAILURE]
    res, (op, applied) = run_keys(srv.address, KeyScript(script, push), 1, max_delta=0.25)
    ep = by_episode(journaled_until(journal, res[0].rows))[0]
    want = np.zeros(20, bool)
    want[3:12] = True
    np.testing.assert_array_equal(ep["intervention"], want)  # flagged through the device's failure too
    acts = np.stack(applied)
    assert ep["held"][6:9].all() and not ep["held"][3:6].any()  # the safety layer held while the device was gone
    norms = np.abs(acts[5:9]).sum(1)
    assert (np.diff(norms) < 0).all()  # towards the hold (by the limit), never the last device command again
    assert op.stats.device_faults == 3 and op.stats.takeovers == 1  # one takeover, through the failure
    steps = np.abs(np.diff(acts, axis=0))  # (the first command of an episode is free for a delta-action robot)
    assert steps.max() <= 0.25 + 1e-6  # takeover, failure and hand-back all through the safety layer's limit


def test_unknown_operator_args_and_operators_are_refused_in_one_line(capsys):
    assert run_drive(compose("drive", ["driver=mock", "operator=keyboard", "operator_args.patiense=3"])) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "patiense" in out and "patience" in out
    assert run_drive(compose("drive", ["driver=mock", "operator=keybaord"])) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "'keyboard'" in out


def test_kill_9_of_drive_during_a_takeover_loses_at_most_the_step_in_flight(server, tmp_path):
    srv, journal = server
    outbox = tmp_path / "outbox"
    args = [sys.executable, "-m", "qc_robot.cli", "drive", f"server={srv.address}", f"env={TASK}", "driver=sim",
            "realtime=false", "blind=true", "episodes=1", "seed=11", f"outbox_dir={outbox}", "operator=scripted",
            "max_steps=400", "operator_args.patience=3", "operator_args.takeover_steps=300",
            "operator_args.noise=0.5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = outbox / "stage.log"
    try:
        import threading

        ev = threading.Event()
        for _ in range(6000):  # until the stage holds takeover steps (bounded; a hang guard, not a timing)
            if stage.exists() and _staged(stage)[1] > 0:
                break
            assert proc.poll() is None, "drive ended before the kill"
            ev.wait(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    staged, taken = _staged(stage)
    assert taken > 0
    # a new drive on the same outbox sends the cut episode (truncated at its last staged step) first
    assert run_drive(compose("drive", [f"server={srv.address}", f"env={TASK}", "driver=sim", "realtime=false",
                                       "blind=true", "episodes=1", "seed=12", f"outbox_dir={outbox}",
                                       "operator=scripted", "max_steps=20", "outbox_drain_s=60"])) == 0
    eps = by_episode(journaled(journal))
    cut = eps[0]
    assert len(cut["rewards"]) == staged and cut["truncated"][-1]
    assert int(cut["intervention"].sum()) == taken
    assert 1 in eps  # the new run's episode is numbered after the cut one, never glued to it


def _staged(path: Path) -> tuple[int, int]:
    """(steps, takeover steps) durable in a stage file right now."""
    from qc_robot import protocol as P
    from qc_robot.data.frames import read_frame

    n = k = 0
    with path.open("rb") as f:
        while (payload := read_frame(f, 1 << 30)) is not None:
            tr = P.decode(payload)
            n += len(tr.actions)
            k += int(np.asarray(tr.intervention).sum())
    return n, k


@pytest.mark.slow
def test_demo_fine_tunes_a_blind_sim_with_the_scripted_operator(tmp_path, tiny_dataset, capsys):
    """The rehearsal of a real-arm session in one command (about a minute: a learner process)."""
    from qc_robot.cli import main

    run = tmp_path / "smoke"
    assert main(["train", "experiment=smoke", "agent=qc_fql", f"data.path={tiny_dataset}", f"training.run_dir={run}",
                 "training.online_steps=0", "training.eval_episodes=0", "env.sparse_reward=true"]) == 0
    capsys.readouterr()
    assert main(["demo", f"finetune={run / 'checkpoint.pt'}", "episodes=2", "realtime=false", "blind=true",
                 "operator=scripted", "operator_args.patience=5", "env.max_episode_steps=30", "push_every=20",
                 f"finetune_dir={tmp_path / 'ft'}", "status=false"]) == 0
    out = capsys.readouterr().out
    assert "operator scripted: takeovers" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("fine-tune"))
    assert "policy v0 → v" in line and not line.split("→ v")[1].startswith("0")
    assert "60 env steps" in (tmp_path / "ft" / "finetune.log").read_text()
