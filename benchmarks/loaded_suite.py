"""The default test suite under load: two busy processes per core beside it (a user's laptop).

    python benchmarks/loaded_suite.py                          # the default suite, loaded, then quiet
    python benchmarks/loaded_suite.py --no-quiet -- tests/test_cli.py -k group   # a subset, loaded only
    python benchmarks/loaded_suite.py --per-core 2 --out docs/loaded_suite.md

Starts ``per_core x cores`` processes that spin on the CPU at normal priority, runs
``python -m pytest -q`` (with the arguments after ``--``) beside them, stops them, and reports
the wall time, the load average seen during the run and pass/fail counts; ``--quiet`` (default on)
runs the same command again without the load for comparison. The result is appended to ``--out``
(a markdown table with the exact command), so the README's figures can be re-measured.
Exit code: pytest's, from the loaded run.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _spin(stop: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_pytest(args: list[str], log: Path | None = None) -> tuple[int, float, str, float]:
    """(exit code, wall seconds, pytest's summary line, the highest 1-min load average seen).
    ``log``: where pytest's whole output is kept (a failure under load is diagnosed from it)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    peak = [os.getloadavg()[0]]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(5.0):
            peak[0] = max(peak[0], os.getloadavg()[0])

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    done.set()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
        print(f"pytest's output: {log}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)),
                   lines[-1] if lines else "(no output)")
    summary = re.sub(r" in [\d.]+s( \([\d:]+\))?$", "", summary)  # the wall time is reported on its own
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    if failed:
        print("\n".join(failed))
    return proc.returncode, wall, summary, peak[0]


def loaded(args: list[str], busy: int, log: Path | None = None) -> tuple[int, float, str, float]:
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in procs:
        p.start()
    try:
        return run_pytest(args, log)
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-core", type=int, default=2, help="busy processes per core (default 2)")
    ap.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=True,
                    help="also run without the load, for comparison (default: yes)")
    ap.add_argument("--out", default="docs/loaded_suite.md", help="markdown file the result is appended to")
    ap.add_argument("--log", default="runs/loaded_suite",
                    help="folder for pytest's whole output of each run ('' : not kept)")
    ap.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: the default suite)")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    busy = a.per_core * cores
    shown = " ".join(a.pytest_args) or "(default suite)"
    print(f"pytest {shown}: loaded with {busy} busy processes ({a.per_core} per core, {cores} cores)", flush=True)
    code, wall, summary, peak = loaded(a.pytest_args, busy, REPO / a.log / "loaded.log" if a.log else None)
    print(f"loaded: {summary} in {wall:.0f} s (load average up to {peak:.1f})", flush=True)
    rows = [("loaded", f"{busy} ({a.per_core}/core)", wall, peak, summary)]
    if a.quiet:
        qcode, qwall, qsummary, qpeak = run_pytest(a.pytest_args, REPO / a.log / "quiet.log" if a.log else None)
        print(f"quiet: {qsummary} in {qwall:.0f} s (load average up to {qpeak:.1f})", flush=True)
        rows.append(("quiet", "0", qwall, qpeak, qsummary))
    out = REPO / a.out
    new = not out.exists()
    with out.open("a") as f:
        if new:
            f.write("# The test suite under load\n\nWritten by `python benchmarks/loaded_suite.py` (each run "
                    "appends a section): the default suite beside busy processes at normal priority, two per "
                    "core, as on a user's busy laptop, and the same command on a quiet machine.\n")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        f.write(f"\n## {stamp}: `pytest {shown}`\n\n{cores} cores ({platform.processor() or platform.machine()}), "
                f"Python {platform.python_version()}; the load average (1 min) includes whatever else ran, and the quiet run starts while the loaded one's still decays.\n\n"
                "| run | busy processes | wall (s) | load average, peak | result |\n|---|---|---|---|---|\n")
        for run, b, w, p, s in rows:
            f.write(f"| {run} | {b} | {w:.0f} | {p:.1f} | {s} |\n")
    print(f"written to {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
