"""Sysid on realtime logs from hidden-physics sim robots: the matrix of docs/calibration.md.

    python benchmarks/calibration_matrix.py                    # all 8 robots
    python benchmarks/calibration_matrix.py --robots 0 1 2 3   # a subset (split long runs)
    python benchmarks/calibration_matrix.py --robots --heldout 6   # only the 6 held-out robots (ids 100..105)

The held-out robots are drawn from a seeded generator (``heldout_robots``) over the same span,
never looked at while the fit's defaults were chosen: a check that they were not tuned to the 8.

Each "robot" is the realtime sim driver (20 Hz control, run at ``--time-scale`` x real time)
with physics and an actuation delay the fit is not told. It logs ``--episodes`` x ``--steps``
excitation steps through ``record_excitation`` (rows = the robot's executed steps), and
``qc_robot.calibration.sysid.identify`` fits kp, damping, armature, friction and the delay, with the same
defaults as ``qc-robot calibrate step=sysid`` unless overridden. Printed: markdown rows (hidden,
fitted, relative error, range, truth in range, identifiable) and replay errors (nominal, fitted,
at the truth; and the truth replayed as loop rows with its whole-step delay, which is what the
old lockstep replayer did with a realtime log). CPU only; run it under the shared CPU lock.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TASK = "cube-single-task1"
KINDS = ("kp", "damping", "armature", "frictionloss")
ROBOTS = [  # (kp, damping, armature, frictionloss, delay steps); the first is the docs' example robot
    (0.7, 2.0, 1.0, 0.0, 2),
    (1.3, 0.6, 1.0, 0.0, 1),
    (0.5, 1.5, 2.0, 0.0, 3),
    (1.6, 1.2, 0.5, 0.5, 0),
    (0.85, 3.0, 1.5, 0.0, 2),
    (2.0, 2.5, 3.0, 0.2, 1),
    (0.6, 0.8, 0.7, 1.0, 4),
    (1.1, 1.0, 1.2, 0.0, 2),
]

HELDOUT_SEED = 2026


def heldout_robots(n: int, seed: int = HELDOUT_SEED) -> list[tuple[float, float, float, float, int]]:
    """``n`` robots drawn over the matrix's span (kp 0.5-2, damping 0.6-3, armature 0.5-3 log-uniform;
    friction 0 or uniform 0-1 N·m, even odds; delay 0-4 steps)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kp, damping, armature = (float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                                 for lo, hi in ((0.5, 2.0), (0.6, 3.0), (0.5, 3.0)))
        friction = float(rng.choice([0.0, rng.uniform(0.0, 1.0)]))
        out.append((round(kp, 3), round(damping, 3), round(armature, 3), round(friction, 3), int(rng.integers(0, 5))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--robots", type=int, nargs="*", default=list(range(len(ROBOTS))))
    ap.add_argument("--heldout", type=int, default=0, help="also fit this many held-out robots (ids 100, 101, ...)")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--global-evals", type=int, default=480)
    ap.add_argument("--max-iters", type=int, default=30)
    ap.add_argument("--global-rows", type=int, default=0)
    ap.add_argument("--starts", type=int, default=1)
    ap.add_argument("--global-segment", type=int, default=10, help="rows per replay segment, global stage (0: whole)")
    ap.add_argument("--local-segment", type=int, default=10, help="rows per segment, first local stage (0: skip it)")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from qc_robot.calibration.excitation import record_excitation
    from qc_robot.calibration.files import Calibration, save_calibration
    from qc_robot.calibration.logs import load_trajectories
    from qc_robot.calibration.replay import Replayer
    from qc_robot.calibration.sysid import Timing, identify, obs_scale, replay_error, residuals, rms
    from qc_robot.drivers.sim import SimConfig, SimDriver

    robots = {i: ROBOTS[i] for i in args.robots}
    robots.update({100 + j: r for j, r in enumerate(heldout_robots(args.heldout))})
    rep = Replayer(TASK)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, robot in robots.items():
            *vals, delay = robot
            hidden = dict(zip(KINDS, vals, strict=True))
            cal = save_calibration(Calibration(f"hidden{i}", TASK, physics={"params": hidden, "ranges": {},
                                                                            "control_delay_steps": delay}),
                                   Path(tmp) / f"hidden{i}.json")
            data = f"{tmp}/robot{i}.hdf5"
            driver = SimDriver(SimConfig(env=TASK, calibration=str(cal), time_scale=args.time_scale))
            t0 = time.monotonic()
            try:
                record_excitation(driver, data, args.episodes, args.steps, seed=100 + 10 * i,
                                  env_args={"task": TASK}, time_scale=args.time_scale)
                held = driver.missed_ticks
            finally:
                driver.close()
            trajs = load_trajectories(data, TASK, args.episodes, args.steps)
            t_fit, load0 = time.monotonic(), os.getloadavg()[0]
            res = identify(TASK, trajs, KINDS, max_iters=args.max_iters, replayer=rep, global_evals=args.global_evals,
                           seed=i, global_rows=args.global_rows, starts=args.starts,
                           global_segment=args.global_segment, local_segment=args.local_segment)
            fit_s, load1 = time.monotonic() - t_fit, os.getloadavg()[0]
            at_truth = replay_error(rep, trajs, hidden, res.timing or Timing(delay, shift=0), res.mode)
            # the old lockstep replayer's view of the same log: whole episodes of the pose, loop rows
            truth_as_rows = rms(residuals(rep, trajs, hidden, Timing(delay), obs_scale(trajs)))
            row = {"robot": i, "mode": res.mode, "hidden": hidden, "delay": delay, "fit": res.params, "ranges": res.ranges,
                   "fit_delay": res.delay_steps, "latency_ms": res.latency_ms, "error_before": res.error_before,
                   "error_global": res.error_global, "error_after": res.error_after, "error_at_truth": at_truth,
                   "truth_as_loop_rows": truth_as_rows, "held_ticks": held,
                   "identifiable": {k: res.identifiability[k].get("identifiable", True) for k in KINDS},
                   "evals": res.evals, "seconds": time.monotonic() - t0, "fit_seconds": fit_s,
                   "load_avg_1min": [load0, load1]}
            out.append(row)
            print(f"robot {i}: " + json.dumps(row, default=float), flush=True)
    rep.close()
    _table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


def _table(rows: list[dict]) -> None:
    print("\n| robot | param | hidden | fitted | rel. error | range | truth in range | identifiable |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for k in KINDS:
            h, f = r["hidden"][k], r["fit"][k]
            lo, hi = r["ranges"][k]
            err = f"{(f - h) / h:+.1%}" if h else f"{f - h:+.3f} N·m"
            print(f"| {r['robot']} | {k} | {h:g} | {f:.3f} | {err} | [{lo:.3f}, {hi:.3f}] | "
                  f"{'yes' if lo <= h <= hi else 'NO'} | {'yes' if r['identifiable'][k] else 'no'} |")
        lat = r["latency_ms"]
        print(f"| {r['robot']} | delay (steps) | {r['delay']} | {r['fit_delay']} | "
              f"{'exact' if r['fit_delay'] == r['delay'] else 'WRONG'} | {lat[0]:.0f}-{lat[1]:.0f} ms | | |")
    print("\n| robot | held ticks | replay error: nominal | fitted | at the truth | truth as loop rows (pose, "
          "whole episodes) | reduction | replays | fit s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['robot']} | {r['held_ticks']} | {r['error_before']:.4f} | {r['error_after']:.2g} | "
              f"{r['error_at_truth']:.2g} | {r['truth_as_loop_rows']:.4f} | "
              f"x{r['error_before'] / max(r['error_after'], 1e-12):.0f} | {r['evals']} | {r['fit_seconds']:.0f} | "
              f"{r['load_avg_1min'][0]:.1f}-{r['load_avg_1min'][1]:.1f} |")


if __name__ == "__main__":
    main()
