"""``drive reward_model=``: the success detector ends episodes with the sparse reward, the operator
overrules it either way, and a detector that does not fit the robot is refused at start. Real
ZeroMQ server and journal, real onnxruntime detectors (hand-built weights, so the step they fire
on follows from the recorded observations), the mock arm and the blind sim."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qc_robot.cli import compose
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.drive import build_driver, run_drive
from qc_robot.drivers.episode_stage import EpisodeStage
from qc_robot.drivers.executor import ChunkExecutor
from qc_robot.drivers.runner import run_episode
from qc_robot.finetune.client import _record
from qc_robot.policies.base import ObsField
from qc_robot.policies.scripted import HoldPolicy, simple_spec
from qc_robot.policies.success_detector import DetectorMetadata, SuccessDetector
from qc_robot.reward.export import export_detector
from qc_robot.reward.model import DetectorNet
from qc_robot.server.app import ControlServer
from qc_robot.server.journal import Journal
from qc_robot.server.learner_link import LearnerLink
from qc_robot.teleop.devices import Event, TeleopCommand, TeleopDevice
from qc_robot.teleop.operator import Operator

OBS, ACT, H = 10, 5, 5  # the mock arm: state = [position (5), goal (5)]
LINE = 1.0  # the detector says success once the mock's position[0] is past this


def _export(path: Path, weight: list[float], bias: float, key: str = "state", dim: int = OBS) -> Path:
    """P(success) = sigmoid(weight · state + bias), threshold 0.5, debounce 3."""
    net = DetectorNet(dim, {}, hidden=[])
    with torch.no_grad():
        lin = net.head.net[0]
        lin.weight.copy_(torch.tensor([weight], dtype=torch.float32))
        lin.bias.fill_(bias)
    meta = DetectorMetadata(obs_fields=[ObsField(key, (dim,), "float32")], threshold=0.5, debounce=3, task="unit")
    out, err = export_detector(net, meta, path, np.zeros((2, dim), np.float32), {})
    assert err <= 1e-5
    return out


@pytest.fixture(scope="module")
def past_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fires on the third consecutive frame with position[0] >= LINE (10·(x − 1) >= 0)."""
    return _export(tmp_path_factory.mktemp("det") / "line.onnx", [10.0] + [0.0] * (OBS - 1), -10.0 * LINE)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlServer, Journal]]:
    """A policy that always pushes position[0] up (+1, i.e. +0.1 a step on the mock), served with a journal."""
    journal = Journal(str(tmp_path / "journal"))
    link = LearnerLink(f"ipc://{tmp_path / 'learner.ipc'}", journal)
    push = HoldPolicy(simple_spec(OBS, ACT, H), hold=[1.0, 0, 0, 0, 0])
    srv = ControlServer(push, "tcp://127.0.0.1:*", learner_link=link).start()
    yield srv, journal
    srv.stop()


def episodes(journal: Journal, rows: int) -> dict[int, dict[str, np.ndarray]]:
    """The journaled steps per episode, once ``rows`` of them are in (a bounded poll)."""
    import threading

    ev = threading.Event()
    for _ in range(2000):
        trs = [_record(raw).transition for raw in journal.read(1, max_records=100_000)]
        if sum(len(t.actions) for t in trs) >= rows:
            break
        ev.wait(0.01)
    out: dict[int, dict[str, list[Any]]] = {}
    for tr in trs:
        ep = out.setdefault(tr.episode_id, {k: [] for k in ("x", "rewards", "terminals", "truncated", "label")})
        ep["x"].append(tr.next_obs["state"][:, 0])
        for k in ("rewards", "terminals", "truncated"):
            ep[k].append(getattr(tr, k))
        ep["label"].append(np.array([tr.reward] * len(tr.actions)))
    return {e: {k: np.concatenate(v) for k, v in d.items()} for e, d in out.items()}


def expected_fire(x: np.ndarray) -> int:
    """The first step whose next observation is the third in a row past the line."""
    run = 0
    for i, v in enumerate(x):
        run = run + 1 if v >= LINE else 0
        if run == 3:
            return i
    raise AssertionError(f"position[0] never stayed past {LINE} for 3 steps: {x}")


def test_the_detector_ends_each_episode_as_a_sparse_success(server, past_line, tmp_path, capsys):
    srv, journal = server
    cfg = compose("drive", [f"server={srv.address}", "driver=mock", f"reward_model={past_line}", "episodes=2",
                            f"outbox_dir={tmp_path / 'outbox'}", "outbox_drain_s=60"])
    assert run_drive(cfg) == 0
    out = capsys.readouterr().out
    assert "success 2/2" in out and "reward model: fired in 2/2 episodes" in out, out
    rows = sum(int(line.split("rows ")[1].split()[0]) for line in out.splitlines() if line.startswith("episode "))
    eps = episodes(journal, rows)
    assert sorted(eps) == [0, 1]
    for e in eps.values():
        k = expected_fire(e["x"])
        assert len(e["x"]) == k + 1, "the episode ends on the step the detector fired on"
        np.testing.assert_array_equal(e["rewards"], [-1.0] * k + [0.0])  # the sparse convention
        assert e["terminals"][-1] and not e["terminals"][:-1].any() and not e["truncated"].any()
        assert set(e["label"]) == {"sparse"}


class Reviewer(TeleopDevice):
    """An operator who presses ready at each reset and, when the detector fires, ``on_fire``;
    ``at`` = (tick, event): presses that event at that tick of the episode."""

    name = "reviewer"

    def __init__(self, on_fire: Event | None = None, at: tuple[int, Event] | None = None) -> None:
        self.on_fire, self.at = on_fire, at
        self.fired, self.in_episode, self.tick = False, False, 0

    def read(self) -> TeleopCommand:
        if not self.in_episode:
            return TeleopCommand(None, [Event.START])
        if self.fired:
            return TeleopCommand(None, [self.on_fire] if self.on_fire else [])
        self.tick += 1
        return TeleopCommand(None, [self.at[1]] if self.at and self.tick == self.at[0] else [], takeover=False)

    def episode_started(self, obs: Any) -> None:
        self.in_episode, self.fired, self.tick = True, False, 0

    def episode_ended(self) -> None:
        self.in_episode = False

    def detector_fired(self) -> None:
        self.fired = True


def _run(srv: ControlServer, device: Reviewer, det: SuccessDetector, tmp_path: Path) -> Any:
    cfg = compose("drive", [f"server={srv.address}", "driver=mock"])
    driver = build_driver(cfg)
    driver.connect()
    client = PolicyClient(srv.address, driver.spec.hello("mock"), outbox=None)
    welcome = client.connect(10.0)
    ex = ChunkExecutor(client, welcome.chunk_len, "open_loop", wait_when_empty=True)
    try:
        return run_episode(driver, ex, 0, 5, None, client, send_transitions=True, operator=Operator(device),
                           stage=EpisodeStage(tmp_path / "stage.log"), verdict_rewards=True, detector=det,
                           review_s=600.0)  # a cap: the reviewer answers on the first review tick
    finally:
        client.close()
        driver.close()


def test_the_operator_overrules_a_false_success_in_the_review(server, past_line, tmp_path):
    srv, journal = server
    det = SuccessDetector.load(past_line)
    r = _run(srv, Reviewer(on_fire=Event.FAILURE), det, tmp_path)
    assert r.detector_fired and r.verdict == "failure" and not r.success and r.overruled == "false_positive"
    e = episodes(journal, r.rows)[0]
    assert len(e["x"]) == expected_fire(e["x"]) + 1
    np.testing.assert_array_equal(e["rewards"], -np.ones(r.rows))  # no success reward survives
    assert not e["terminals"].any() and e["truncated"][-1]
    assert det.summary()["overrules_false_positive"] == 1


def test_a_success_the_detector_missed_is_the_operators_and_counted(server, tmp_path):
    srv, journal = server
    never = _export(tmp_path / "never.onnx", [0.0] * OBS, -10.0)  # p ≈ 0: it never fires
    det = SuccessDetector.load(never)
    r = _run(srv, Reviewer(at=(4, Event.SUCCESS)), det, tmp_path)
    assert not r.detector_fired and r.verdict == "success" and r.overruled == "false_negative"
    e = episodes(journal, r.rows)[0]
    assert r.rows == 3  # the verdict came before the fourth step was acted
    np.testing.assert_array_equal(e["rewards"], [-1.0, -1.0, 0.0])
    assert e["terminals"][-1] and det.summary()["overrules_false_negative"] == 1


def test_a_detector_that_does_not_fit_the_robot_is_refused_at_start(tmp_path, capsys):
    narrow = _export(tmp_path / "narrow.onnx", [1.0] * 4, 0.0, dim=4)
    cases = [
        (["driver=mock", f"reward_model={narrow}"], "'state' is [10], the detector reads [4]"),
        (["driver=mock", f"reward_model={tmp_path / 'missing.onnx'}"], "reward_model: no file"),
        (["driver=mock", f"reward_model={narrow}", "reward=verdict"], "cannot be combined with reward=verdict"),
        (["driver=mock", "reward=detector"], "reward=detector needs reward_model"),
        (["driver=sim", f"reward_model={narrow}"], "needs blind=true"),
    ]
    for args, said in cases:
        assert run_drive(compose("drive", ["server=tcp://127.0.0.1:9", "connect_timeout_s=0.2", *args])) == 2
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and said in out[0], (args, out)


def test_the_scripted_operator_reviews_fires_against_the_hidden_truth(tmp_path):
    """The blind sim with an always-firing detector: the scripted operator (verdicts=false) lets
    the detector decide and overrules each of its fires that the sim's hidden success denies."""
    from qc_robot.server.serve import load_policy
    from qc_robot.teleop.operator import OperatorConfig
    from qc_robot.teleop.supervisor import ScriptedSupervisor

    srv = ControlServer(load_policy("default"), "tcp://127.0.0.1:*").start()
    try:
        cfg = compose("drive", [f"server={srv.address}", "env=cube-single-task1", "driver=sim", "realtime=false",
                                "blind=true"])
        driver = build_driver(cfg)
        always = _export(tmp_path / "always.onnx", [0.0] * driver.spec.obs_fields[0].shape[0], 10.0,
                         key=driver.spec.obs_fields[0].key, dim=driver.spec.obs_fields[0].shape[0])
        det = SuccessDetector.load(always)
        sup = ScriptedSupervisor.for_driver(driver, OperatorConfig(verdicts=False, rate=0.0))
        driver.connect()
        client = PolicyClient(srv.address, driver.spec.hello("sim"), outbox=None)
        ex = ChunkExecutor(client, client.connect(10.0).chunk_len, "open_loop", wait_when_empty=True)
        r = run_episode(driver, ex, 0, 3, None, client, operator=Operator(sup), stage=EpisodeStage(),
                        verdict_rewards=True, detector=det, review_s=600.0)
        truth = driver.driver.hidden_info().success
        client.close()
        driver.close()
    finally:
        srv.stop()
    assert r.detector_fired and r.rows == 3  # debounce 3 on a detector that always says yes
    assert not truth and r.verdict == "failure" and r.overruled == "false_positive"


@pytest.mark.parametrize("missed_after", [0, 5])
def test_the_scripted_operator_presses_success_on_one_the_detector_missed(tmp_path, missed_after):
    """A never-firing detector on the blind sim, the oracle in control throughout: with
    ``missed_after`` the scripted operator overrules the missed success once it has held that many
    ticks; without it the episode runs on, and ends a failure on the detector's word."""
    from qc_robot.server.serve import load_policy
    from qc_robot.teleop.operator import OperatorConfig
    from qc_robot.teleop.supervisor import ScriptedSupervisor

    srv = ControlServer(load_policy("default"), "tcp://127.0.0.1:*").start()
    try:
        cfg = compose("drive", [f"server={srv.address}", "env=cube-single-task1", "driver=sim", "realtime=false",
                                "blind=true"])
        driver = build_driver(cfg)
        f = driver.spec.obs_fields[0]
        det = SuccessDetector.load(_export(tmp_path / "never.onnx", [0.0] * f.shape[0], -10.0, key=f.key,
                                           dim=f.shape[0]))
        sup = ScriptedSupervisor.for_driver(driver, OperatorConfig(
            verdicts=False, missed_after=missed_after, patience=1, takeover_steps=400, max_takeovers=1, noise=0.0))
        driver.connect()
        client = PolicyClient(srv.address, driver.spec.hello("sim"), outbox=None)
        ex = ChunkExecutor(client, client.connect(10.0).chunk_len, "open_loop", wait_when_empty=True)
        held: list[bool] = []
        r = run_episode(driver, ex, 0, 3, None, client, operator=Operator(sup), stage=EpisodeStage(),
                        verdict_rewards=True, detector=det, review_s=600.0,
                        on_rows=lambda rows: held.extend(driver.driver.hidden_info().success for _ in rows))
        client.close()
        driver.close()
    finally:
        srv.stop()
    assert not r.detector_fired
    assert any(held), "the oracle never reached the goal: nothing to miss"
    if missed_after:
        assert r.verdict == "success" and r.success and r.overruled == "false_negative"
        assert det.summary()["overrules_false_negative"] == 1
    else:
        assert not r.success and r.verdict == "failure" and not r.overruled
