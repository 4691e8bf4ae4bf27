"""Teleop: scripted sessions in real MuJoCo, the keyboard device on a real pty, the CLI path."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import termios
import time

import h5py
import numpy as np
import pytest

from qc_robot.config import EnvConfig
from qc_robot.data.hdf5_io import DatasetError, load_flat, validate
from qc_robot.data.recorder import Recorder, journal_path
from qc_robot.teleop.config import TeleopConfig
from qc_robot.teleop.devices import Event, make_device
from qc_robot.teleop.keyboard import KeyboardDevice, parse_keys
from qc_robot.teleop.session import run_teleop

pytest.importorskip("ogbench")


def _scripted(out: str, **kw) -> TeleopConfig:
    return TeleopConfig(driver="sim", env=EnvConfig(name="cube-single-task1"), device="scripted", out=out, realtime=False,
                        time_scale=1000.0, end_after=8, operator="tester", calibration_id="cal-7", status=False, **kw)


def test_scripted_session_records_labels_and_attrs(tmp_path):
    out = str(tmp_path / "demos.hdf5")
    t0 = time.time()
    assert run_teleop(_scripted(out, outcomes=["auto", "failure", "discard", "success"])) == 0
    assert validate(out) == []
    ds = load_flat(out)
    assert len(ds.episode_ends) == 3  # the discarded one is gone, its re-record kept
    with h5py.File(out) as f:
        demos = [f[f"data/demo_{i}"] for i in range(3)]
        assert [d.attrs["label"] for d in demos] == ["success", "failure", "success"]
        assert [bool(d.attrs["success"]) for d in demos] == [True, False, True]
        assert [int(d.attrs["seed"]) for d in demos] == [0, 1, 2]  # the re-record reuses the seed
        for d in demos:
            assert d.attrs["operator"] == "tester" and d.attrs["device"] == "scripted"
            assert d.attrs["driver"] == "sim" and d.attrs["calibration_id"] == "cal-7"
            assert t0 <= d.attrs["start_time"] <= d.attrs["end_time"] <= time.time()
        assert len({d.attrs["uuid"] for d in demos}) == 3
        auto = demos[0]
        assert 20 < auto.attrs["num_samples"] < 80 and auto["dones"][-1] == 1.0  # the env ended it: success
        assert [int(d.attrs["num_samples"]) for d in demos[1:]] == [8, 8]  # verdict keys after 8 steps
        # next_obs of step t is obs of step t+1: one continuous trajectory
        np.testing.assert_array_equal(auto["obs/state"][1:], auto["next_obs/state"][:-1])
    assert np.abs(ds.actions).max() <= 1.0
    assert not os.path.exists(journal_path(out))

    # a second session appends; episode seeds continue
    assert run_teleop(_scripted(out, outcomes=["failure"])) == 0
    with h5py.File(out) as f:
        assert int(f["data/demo_3"].attrs["seed"]) == 3 and f["data"].attrs["total"] == len(load_flat(out))


def test_recorder_refuses_other_env_args_and_second_writer(tmp_path):
    out = str(tmp_path / "d.hdf5")
    obs = {"state": np.zeros(3, np.float32)}
    with Recorder(out, {"task": "a"}) as rec:
        rec.begin(obs, {})
        rec.step(np.zeros(2), 0.0, False, obs)
        rec.finish("success")
        with pytest.raises(DatasetError, match="another process"):
            Recorder(out, {"task": "a"})
    with pytest.raises(DatasetError, match="other env_args"):
        Recorder(out, {"task": "b"})


def test_parse_keys():
    assert parse_keys(b"w\x1b[Ax \r\x1b[15~g\x1b") == ["w", "up", "x", "space", "enter", "g", "esc"]
    assert parse_keys(b"\x1bOD\n") == ["left", "enter"]


def test_keyboard_device_on_a_real_pty():
    master, slave = pty.openpty()
    now = [100.0]
    dev = KeyboardDevice(fd=slave, speed=0.5, hold_s=0.25, clock=lambda: now[0])
    try:
        assert termios.tcgetattr(slave)[3] & termios.ICANON
        with dev:
            lflag = termios.tcgetattr(slave)[3]
            assert not lflag & termios.ICANON and not lflag & termios.ECHO  # cbreak: keys arrive at once
            assert lflag & termios.ISIG  # Ctrl-C still interrupts
            assert dev.read().events == []
            os.write(master, b"w\x1b[D")  # x+ and (arrow) y+
            cmd = dev.read()
            np.testing.assert_allclose(cmd.action, [0.5, 0.5, 0, 0, -1])
            now[0] += 0.3  # no repeat bytes within hold_s: the key was released
            np.testing.assert_allclose(dev.read().action, [0, 0, 0, 0, -1])
            os.write(master, b"fe +")  # z-, yaw-, gripper closes, faster
            cmd = dev.read()
            np.testing.assert_allclose(cmd.action, [0, 0, -0.6, -0.6, 1.0])
            os.write(master, b"\n")
            assert dev.read().events == [Event.START]
            os.write(master, b"gbx")
            assert dev.read().events == [Event.SUCCESS, Event.FAILURE, Event.DISCARD]
            os.write(master, b"\x1b")
            assert dev.read().events == [Event.QUIT]
        assert termios.tcgetattr(slave)[3] & termios.ICANON  # restored on close
    finally:
        os.close(master)
        os.close(slave)


def test_missing_optional_device_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspacemouse", None)  # import fails as if not installed
    dev = make_device("spacemouse")
    with pytest.raises(RuntimeError, match=r"qc-robot\[teleop\]"):
        dev.open()


def _read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    assert needle in buf, buf.decode(errors="replace")[-800:]
    return buf


def test_cli_keyboard_session_in_a_terminal(tmp_path):
    """`qc-robot teleop device=keyboard` as a user runs it: a terminal, keys typed, status line."""
    out = str(tmp_path / "kb.hdf5")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qc_robot.cli", "teleop", "driver=mock", "device=keyboard",
                             f"out={out}", "operator=kb"], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    os.close(slave)
    try:
        _read_until(master, b"Enter: start episode")  # key help printed on start
        _read_until(master, b"o idle")  # status line
        os.write(master, b"\n")
        _read_until(master, b"* REC")
        for _ in range(8):
            os.write(master, b"w")
            time.sleep(0.05)
        screen = _read_until(master, b"action [+0.50")  # the status line shows the command
        assert b"\r" in screen and b"Hz" in screen
        os.write(master, b"g")
        _read_until(master, b"SUCCESS")
        os.write(master, b"\x1b")
        _read_until(master, b"saved 1 episodes (1 success")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    ds = load_flat(out)
    assert len(ds.episode_ends) == 1 and (ds.actions[:, 0] == 0.5).sum() >= 3
    with h5py.File(out) as f:
        assert f["data/demo_0"].attrs["device"] == "keyboard" and f["data/demo_0"].attrs["operator"] == "kb"
