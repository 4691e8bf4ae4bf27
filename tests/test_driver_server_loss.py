"""A driver whose server goes away says so, holds, reconnects, and its episode lines and summary
show the time it ran without a server. Real server, real client, mock robot."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.drive import run_drive
from qc_robot.policies.base import ChunkResult
from qc_robot.policies.scripted import HoldPolicy, simple_spec
from qc_robot.server.app import ControlServer


class SlowHold(HoldPolicy):
    """5 ms per chunk, so an episode of 200 steps (40 chunks) lasts ~0.2 s."""

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        time.sleep(0.005)
        return super().predict(obs)


def _server(address: str) -> ControlServer:
    return ControlServer(SlowHold(simple_spec(10, 5, 5)), address).start()


class _Seen(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged (the client's loss warning)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def _until(pred, guard_s: float = 120.0) -> bool:
    """Bounded poll: True once ``pred()`` holds; the guard only stops a hang (a loaded machine is slow)."""
    end = time.monotonic() + guard_s
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_drive_reports_the_time_without_a_server(capsys, caplog) -> None:
    """The outage follows the drive's progress, not the wall clock: the server goes away once a
    whole episode was served (40 chunks of 5 steps) and the next one has begun, and comes back once
    the client has said it lost it, so served, lost and served-again episodes exist at any load."""
    first = _server("tcp://127.0.0.1:*")
    address = first.address
    servers = [first]
    seen = _Seen("lost the server")
    logging.getLogger("qc_robot.client").addHandler(seen)

    def outage() -> None:
        if _until(lambda: first.stats.chunks >= 45):
            first.stop()
            seen.event.wait(120)
        servers.append(_server(address))

    t = threading.Thread(target=outage)
    t.start()
    cfg = DriveConfig(driver="mock", server=address, episodes=12, request_timeout_s=0.3,
                      driver_args={"max_episode_steps": 200})
    try:
        with caplog.at_level("WARNING", logger="qc_robot.client"):
            assert run_drive(cfg) == 0
    finally:
        t.join(300)
        logging.getLogger("qc_robot.client").removeHandler(seen)
        for s in servers:
            s.stop()
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("episode ")]
    assert len(lines) == 12 and any("SERVER LOST" in x for x in lines), out
    assert not all("SERVER LOST" in x for x in lines), out  # before and after the outage: served
    assert "time(s):" in out and "s held in all" in out, out
    assert any("lost the server" in r.getMessage() for r in caplog.records)
