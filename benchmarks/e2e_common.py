"""Shared plumbing of the end-to-end scripts: single-threaded subprocesses that are always
stopped on exit, and the binomial statistics their tables report."""

from __future__ import annotations

import atexit
import math
import os
import signal
import subprocess
import time
from pathlib import Path

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
_procs: list[subprocess.Popen] = []


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def two_prop_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (1.0 when both are 0 or 1)."""
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = abs(k1 / n1 - k2 / n2) / se
    return math.erfc(z / math.sqrt(2))


def run(cmd: list[str], timeout: float, log: Path | None = None) -> tuple[str, float]:
    """Run to completion (raising on failure); returns (stdout+stderr, wall seconds)."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(out)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:2]} exited {r.returncode}:\n{out[-3000:]}")
    wall = time.monotonic() - t0
    print(f"  ({wall:.0f} s)", flush=True)
    return out, wall


def background(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in its own process group, output to ``log``; stopped at exit if still running."""
    print("$", " ".join(cmd), "&", flush=True)
    f = open(log, "w")  # noqa: SIM115 (lives as long as the process)
    p = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    _procs.append(p)
    return p


def stop(p: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 30) -> None:
    """``sig`` to the process group, then SIGKILL if it has not exited within ``wait`` s."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
        p.wait(wait)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)
    except ProcessLookupError:
        pass


@atexit.register
def _cleanup() -> None:
    for p in _procs:
        stop(p, wait=10)
