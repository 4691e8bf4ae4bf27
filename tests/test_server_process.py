"""``qc-robot serve`` as a process: memory under oversized messages, exit on a dead thread, and a
kill -9 mid-episode that loses at most the step in flight."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import numpy as np
from server_procs import ServeProcess
from test_server import Raw, driver_spec

from qc_robot import protocol as P
from qc_robot.data.hdf5_io import load_flat
from qc_robot.server.episode_log import EpisodeLogger


def _heartbeat_sync(raw: Raw, seq: int) -> None:
    raw.sock.send(P.encode(P.Heartbeat(seq, 0.0)))
    while raw.sock.poll(10000):
        m = P.decode(raw.sock.recv())
        if isinstance(m, P.Heartbeat) and m.seq == seq:
            return
    raise AssertionError("no heartbeat echo")


def test_oversized_message_is_refused_before_it_is_buffered() -> None:
    srv = ServeProcess()
    big = Raw(srv.address)
    probe = Raw(srv.address)
    try:
        _heartbeat_sync(probe, 1)
        before = srv.rss_peak_kb()
        payload = bytes(P.MAX_MESSAGE_BYTES + (16 << 20))  # 80 MiB
        big.sock.send(payload)
        del payload
        time.sleep(1.0)  # libzmq reads the frame header and drops the connection
        _heartbeat_sync(probe, 2)  # still serving
        grown_mb = (srv.rss_peak_kb() - before) / 1024
        assert grown_mb < 40, f"the server's peak RSS grew by {grown_mb:.0f} MB"
    finally:
        big.close()
        probe.close()
        srv.kill()


def test_a_dead_thread_takes_the_process_down_with_a_nonzero_exit() -> None:
    srv = ServeProcess(script=[str(Path(__file__).parent / "server_procs.py"), "dying"])
    raw = Raw(srv.address)
    try:
        assert isinstance(raw.send(P.encode(driver_spec(obs_dim=4).hello("raw"))), P.Welcome)
        raw.sock.send(P.encode(P.Observation(1, 0, 0, 0.0, {"state": np.zeros(4, np.float32)})))
        code = srv.wait(20)
    finally:
        raw.close()
        srv.kill()
    assert code == 70, srv.log_text()[-2000:]
    assert "died" in srv.log_text()


def _step(t: int) -> P.Transition:
    o = np.full((1, 4), t, np.float32)
    return P.Transition(0, t, {"state": o}, np.full((1, 2), 0.01 * t, np.float32), np.ones(1, np.float32),
                        np.zeros(1, bool), np.zeros(1, bool), {"state": o + 1})


def test_kill_9_mid_episode_loses_at_most_the_step_in_flight(tmp_path: Path) -> None:
    log_dir = tmp_path / "served"
    srv = ServeProcess(f"log_dir={log_dir}")
    raw = Raw(srv.address)
    sent = 12
    try:
        assert isinstance(raw.send(P.encode(driver_spec(obs_dim=4).hello("raw"))), P.Welcome)
        for t in range(sent):
            raw.sock.send(P.encode(_step(t)))
        _heartbeat_sync(raw, 1)  # every step above has been handled
        raw.sock.send(P.encode(_step(sent)))  # the step in flight
        srv.proc.send_signal(9)
        srv.wait(10)
    finally:
        raw.close()
        srv.kill()
    logger = EpisodeLogger(str(log_dir), {})  # a restarted server recovers what the kill left
    logger.close()
    assert logger.episodes_recovered == 1 and not list((log_dir / "open").glob("*.qcep"))
    files = sorted(log_dir.glob("serve-*.hdf5"))
    assert len(files) == 1  # the killed run's file (the new logger wrote nothing of its own)
    flat = load_flat(str(files[0]))
    n = len(flat.actions)
    assert sent <= n <= sent + 1
    np.testing.assert_allclose(flat.observations[:, 0], np.arange(n))
    np.testing.assert_allclose(flat.actions[:, 0], 0.01 * np.arange(n), rtol=1e-6)
    with h5py.File(files[0]) as f:
        attrs = f["data/demo_0"].attrs
        assert bool(attrs["recovered"]) and not bool(attrs["complete"])
    again = EpisodeLogger(str(log_dir), {})  # recovering twice adds nothing
    again.close()
    assert again.episodes_recovered == 0 and len(load_flat(str(files[0])).actions) == n


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
