"""``qc-robot serve`` as a child process, for tests about the process itself (memory, exit code,
kill -9). Run as a script for the fault-injection case; imported by tests for the helpers.

``python tests/server_procs.py dying``: ``qc-robot serve`` whose policy raises SystemExit on its
first observation (not an Exception, so no per-message handler catches it: a worker thread
dies). The process must exit non-zero by itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ADDR = re.compile(r"serving policy .* on (tcp://\S+)")


class ServeProcess:
    """A child ``qc-robot serve`` on a random loopback port; ``address`` once it is serving."""

    def __init__(self, *overrides: str, script: list[str] | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        args = script or ["-m", "qc_robot.cli", "serve", "policy=hold:4:2:3", "bind='tcp://127.0.0.1:*'",
                          "log_level=INFO", *overrides]
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._found = threading.Event()
        self.address = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._found.wait(60):
            self.kill()
            raise RuntimeError("serve did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = _ADDR.search(line)
            if m and not self.address:
                self.address = m.group(1)
                self._found.set()

    def log_text(self) -> str:
        return "".join(self.lines)

    def rss_peak_kb(self) -> int:
        """VmHWM of the child: the most resident memory it ever had."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def _dying() -> int:
    import numpy as np

    from qc_robot.cli import compose
    from qc_robot.policies.scripted import simple_spec
    from qc_robot.server import serve

    class Dying:
        spec = simple_spec(4, 2, 3, 20.0)

        def predict(self, obs: dict[str, np.ndarray]) -> object:
            raise SystemExit("policy exits")

    serve.load_policy = lambda *a, **k: Dying()  # fault injection in this child only
    return serve.run_serve(compose("serve", ["policy=unused", "bind='tcp://127.0.0.1:*'", "log_level=INFO"]))


if __name__ == "__main__":
    if sys.argv[1:] == ["dying"]:
        sys.exit(_dying())
    time.sleep(0)
