"""Latency step of ``qc-robot calibrate`` against injected actuation latencies (docs/calibration.md).

    python benchmarks/calibration_latency.py                       # 0, 50, 100, 200, 300, 500 ms
    python benchmarks/calibration_latency.py --delays 0 500 --trials 4 --time-scale 2

The robot is the realtime sim driver with ``latency_ms`` injected; the round trip goes through a
real ControlServer (hold policy) on 127.0.0.1. Pass: the recovered actuation delay (median
response minus half a period) within one control step of the injected one. CPU only.
"""

from __future__ import annotations

import argparse
import json
import time

TASK = "cube-single-task1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--delays", type=float, nargs="+", default=[0, 50, 100, 200, 300, 500])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from qc_robot.calibration.latency import measure_latency
    from qc_robot.drivers.sim import SimConfig, SimDriver
    from qc_robot.policies.scripted import HoldPolicy, simple_spec
    from qc_robot.server.app import ControlServer

    rows = []
    print("| injected (ms) | recovered p50 (ms) | p90 (ms) | steps (injected / recovered) | within one step | trials | s |")
    print("|---|---|---|---|---|---|---|")
    for lat in args.delays:
        driver = SimDriver(SimConfig(env=TASK, latency_ms=lat, time_scale=args.time_scale, max_episode_steps=100_000))
        srv = ControlServer(HoldPolicy(simple_spec(28, 5, 5)), "tcp://127.0.0.1:*").start()
        t0 = time.monotonic()
        try:
            res = measure_latency(driver, srv.address, requests=10, trials=args.trials, time_scale=args.time_scale)
        finally:
            srv.stop()
            driver.close()
        period = 1e3 / res["control_hz"]
        a = res["actuation_ms"]
        ok = abs(a["p50"] - lat) < period
        rows.append({"injected_ms": lat, "p50_ms": a["p50"], "p90_ms": a["p90"], "n": a["n"],
                     "steps": res["actuation_delay_steps"], "within_one_step": ok,
                     "seconds": time.monotonic() - t0})
        print(f"| {lat:g} | {a['p50']:.1f} | {a['p90']:.1f} | {round(lat / period)} / {res['actuation_delay_steps']} | "
              f"{'yes' if ok else 'NO'} | {a['n']} | {time.monotonic() - t0:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
