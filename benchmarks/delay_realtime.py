"""Pipelining through the real stack, on the wall clock: ``qc-robot serve delay_ms=D`` and the
realtime sim driver, ``qc-robot drive max_inflight=1`` against ``max_inflight=4``.

``bench_rtc.py`` measures the modes on a simulated clock (exact delays, no load effects). This is
the same question as a user meets it: real processes, the ZeroMQ round trip, the server holding
every reply ``D`` ms after its observation arrived, the robot ticking at 20 Hz whether a chunk
is there or not. Episodes use ``drive seed=S`` (resets S, S+1, ...) in every arm and the server
runs with ``seed=`` (its sampling noise), so the arms differ in the executor only; the wall
clock still makes single episodes differ between runs.

    python benchmarks/delay_realtime.py --delay-ms 150 --episodes 20 --modes temporal_ensemble,latency_aware
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from e2e_common import background, run, stop, wilson  # benchmarks/ is the script's directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=150.0)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--modes", default="temporal_ensemble,latency_aware")
    ap.add_argument("--inflight", default="1,4")
    ap.add_argument("--port", type=int, default=5641)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--dir", default="/tmp/delay_realtime")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{args.port}"
    server = background(["qc-robot", "serve", f"bind={address}",
                         f"delay_ms={args.delay_ms}", "seed=0"], out / "serve.log")
    rows = []
    try:
        for mode in args.modes.split(","):
            for k in args.inflight.split(","):
                text, wall = run(["qc-robot", "drive", f"server={address}", f"mode={mode}",
                                  f"max_inflight={k}", f"episodes={args.episodes}", f"seed={args.seed}",
                                  "policy_expect=default"], timeout=3600, log=out / f"drive_{mode}_{k}.log")
                ok = re.search(r"success (\d+)/(\d+)", text)
                held = re.search(r"held (\d+) of (\d+) robot steps", text)
                delay = re.search(r"inference delay: p50 (\d+), max (\d+)", text)
                overruns = sum(int(x) for x in re.findall(r"overruns (\d+)", text))
                assert ok and held and delay, text[-2000:]
                rows.append((mode, int(k), int(ok[1]), int(ok[2]), int(held[1]), int(held[2]), delay[1], delay[2],
                             overruns, wall))
    finally:
        stop(server)
    print(f"\nserve delay_ms={args.delay_ms:g} seed=0, shipped policy (H = 5), realtime sim at 20 Hz, "
          f"drive seed={args.seed}, {args.episodes} episodes per arm\n")
    print("| mode | in flight ≤ | success [95% Wilson CI] | held ticks (share) | delay p50 / max (steps) | loop overruns | wall |")
    print("|---|---|---|---|---|---|---|")
    for mode, k, s, n, h, steps, d50, dmax, ovr, wall in rows:
        lo, hi = wilson(s, n)
        print(f"| `{mode}` | {k} | {s}/{n} [{100 * lo:.0f}, {100 * hi:.0f}] | {h} of {steps} ({100 * h / max(1, steps):.0f}%) "
              f"| {d50} / {dmax} | {ovr} | {wall:.0f} s |")


if __name__ == "__main__":
    main()
