"""A wrong policy never passes for the right one, and a seeded run repeats exactly.

Real control servers on loopback TCP, the real CLI (``serve`` in a subprocess, ``drive`` in
process), the shipped ONNX policy under onnxruntime and the MuJoCo sim driver in lockstep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qc_robot.assets import default_policy_path
from qc_robot.cli import main
from qc_robot.server.app import ControlServer
from qc_robot.server.serve import load_policy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shipped_server():
    server = ControlServer(load_policy("default"), "tcp://127.0.0.1:*").start()
    yield server
    server.stop()


def _drive(capsys, server: str, *extra: str) -> tuple[int, str]:
    code = main(["drive", "driver=sim", f"server={server}", "realtime=false", "episodes=1", "max_steps=10",
                 "connect_timeout_s=20", *extra])
    return code, capsys.readouterr().out


def test_a_second_serve_on_a_busy_port_exits_2_and_drive_names_the_policy_it_finds(shipped_server, capsys) -> None:
    """The README's old trap: `serve policy=hold:28:5:5 &` on the port the shipped policy holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    busy = subprocess.run([sys.executable, "-m", "qc_robot.cli", "serve", f"bind={shipped_server.address}",
                           "policy=hold:28:5:5"], capture_output=True, text=True, timeout=120, env=env)
    assert busy.returncode == 2, busy.stderr[-2000:]
    assert "Traceback" not in busy.stderr and "Address already in use" in busy.stderr, busy.stderr[-2000:]
    code, out = _drive(capsys, shipped_server.address)
    connected = [x for x in out.splitlines() if x.startswith("connected to")]
    assert code == 0 and len(connected) == 1, out
    assert "the shipped policy (fql, task cube-single-task1" in connected[0], connected
    assert "policy: the shipped policy" in out.splitlines()[-1], out  # and in the summary


def test_policy_expect_refuses_a_server_serving_another_policy(shipped_server, capsys) -> None:
    code, out = _drive(capsys, shipped_server.address, "policy_expect=hold:28:5:5")
    assert code == 2 and "episode 1/1" not in out, out
    line = [x for x in out.splitlines() if x.startswith("drive:")]
    assert len(line) == 1 and "the shipped policy" in line[0] and "not hold:28:5:5" in line[0], out


def test_policy_expect_tells_two_models_apart(shipped_server, capsys, tmp_path) -> None:
    """Another training run's export: same network sizes, another config hash and step."""
    model = onnx.load(default_policy_path())
    props = {p.key: p.value for p in model.metadata_props} | {"config_hash": "0123456789abcdef", "train_step": "500"}
    onnx.helper.set_model_props(model, props)
    mine = tmp_path / "model.onnx"
    onnx.save(model, mine)
    code, out = _drive(capsys, shipped_server.address, f"policy_expect={mine}")
    assert code == 2 and "config_hash 5a0ee3a8c86c4006 (expected 0123456789abcdef)" in out, out
    code, out = _drive(capsys, shipped_server.address, "policy_expect=default")
    assert code == 0 and "episode 1/1" in out, out


def test_drive_names_a_bring_up_policy(capsys) -> None:
    server = ControlServer(load_policy("hold:28:5:5"), "tcp://127.0.0.1:*").start()
    try:
        code, out = _drive(capsys, server.address, "policy_expect=hold:28:5:5")
    finally:
        server.stop()
    assert code == 0 and "policy bring-up scripted policy 28:5:5 (no model" in out, out


def _lockstep_run(policy_seed: int | None, seed: int, episodes: int = 2) -> tuple[list[np.ndarray], list[bool]]:
    """What `serve seed=policy_seed` + `drive realtime=false seed=seed` executes: every applied action."""
    from qc_robot.drivers.client import PolicyClient
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import build_driver
    from qc_robot.drivers.executor import ChunkExecutor
    from qc_robot.drivers.runner import run_episode

    server = ControlServer(load_policy("default", seed=policy_seed), "tcp://127.0.0.1:*").start()
    driver = build_driver(DriveConfig(driver="sim", server=server.address, realtime=False, seed=seed))
    client = PolicyClient(server.address, driver.spec.hello("sim", {"mode": "open_loop"}))
    actions: list[np.ndarray] = []
    outcomes: list[bool] = []
    try:
        driver.connect()
        welcome = client.connect(20.0)
        ex = ChunkExecutor(client, welcome.chunk_len, "open_loop", 0.5, 30.0, wait_when_empty=True)
        for i in range(episodes):
            rows: list[np.ndarray] = []
            r = run_episode(driver, ex, i, seed + i, None, client, False, max_steps=80,
                            on_rows=lambda batch, rows=rows: rows.extend(np.asarray(x.action) for x in batch))
            actions.append(np.stack(rows))
            outcomes.append(bool(r.success))
    finally:
        client.close()
        driver.close()
        server.stop()
    return actions, outcomes


def test_the_same_seeds_give_the_same_rows_and_outcomes() -> None:
    a_actions, a_ok = _lockstep_run(policy_seed=7, seed=100)
    b_actions, b_ok = _lockstep_run(policy_seed=7, seed=100)
    assert a_ok == b_ok
    assert len(a_actions) == len(b_actions) == 2
    for a, b in zip(a_actions, b_actions, strict=True):
        np.testing.assert_array_equal(a, b)
    c_actions, _ = _lockstep_run(policy_seed=8, seed=100, episodes=1)  # the seed is what fixes them
    n = min(len(a_actions[0]), len(c_actions[0]))
    assert not np.array_equal(a_actions[0][:n], c_actions[0][:n])
