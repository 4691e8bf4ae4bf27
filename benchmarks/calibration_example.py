"""The sim calibration example of ``docs/calibration.md``: a hidden-parameter "robot" is calibrated
through the CLI entry point, and the tables and figure of the doc are printed/written.

    python benchmarks/calibration_example.py            # writes docs/img/sysid_example.png

The robot is the sim driver with kp x0.7, damping x2, a 2-step control delay (sysid) and a
100 ms actuation latency (latency step). CPU only, about 20 s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qc_robot.calibration.cli import CalibrateConfig, run_calibrate
from qc_robot.calibration.files import Calibration, load_calibration, save_calibration

TASK = "cube-single-task1"
HIDDEN = {"kp": 0.7, "damping": 2.0, "armature": 1.0, "frictionloss": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--png", default=str(Path(__file__).resolve().parent.parent / "docs/img/sysid_example.png"))
    args = ap.parse_args()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hidden = save_calibration(Calibration("hidden", TASK, physics={"params": HIDDEN, "ranges": {},
                                                                      "control_delay_steps": 2}),
                                  Path(tmp) / "hidden.json")
        common = dict(robot_id="example", task=TASK, dataset=f"{tmp}/excite.hdf5", out=f"{tmp}/example.json")
        run_calibrate(CalibrateConfig(step="excite", realtime=False, driver_args={"calibration": str(hidden)},
                                      **common))
        run_calibrate(CalibrateConfig(step="all", latency_ms=100.0, plot=args.png, **common))
        cal = load_calibration(common["out"])
    phys, lat = cal.physics or {}, cal.latency or {}
    fit = phys["fit"]
    print("\n| parameter | hidden | fitted | randomization range |\n|---|---|---|---|")
    for k, v in HIDDEN.items():
        lo, hi = phys["ranges"][k]
        print(f"| {k} | {v:g} | {phys['params'][k]:.3f} | [{lo:.3f}, {hi:.3f}] |")
    print(f"| control delay (steps) | 2 | {phys['control_delay_steps']} | |")
    print("\n| replay error | nominal model, no delay | fitted |\n|---|---|---|")
    print(f"| normalised RMS (proprio dims) | {fit['error_before']:.4f} | {fit['error_after']:.4f} |")
    jb, ja = fit["joint_pos_rmse_rad"]
    eb, ea = fit["effector_rmse_m"]
    print(f"| joint position RMSE (rad) | {jb:.4f} | {ja:.4f} |\n| effector position RMSE (m) | {eb:.4f} | {ea:.4f} |")
    print(f"\nsysid: {fit['evals']} replays in {fit['seconds']:.1f} s")
    r, a = lat["rtt_ms"], lat["actuation_ms"]
    print("\n| latency (injected actuation 100 ms) | p50 | p90 | p99 | steps |\n|---|---|---|---|---|")
    print(f"| round trip obs->chunk (ms) | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | "
          f"{lat['inference_delay_steps']} (inference delay) |")
    print(f"| actuation (ms) | {a['p50']:.1f} | {a['p90']:.1f} | {a['p99']:.1f} | "
          f"{lat['actuation_delay_steps']} (actuation delay) |")
    print(f"\ncalibration id {cal.id}; figure {args.png}")


if __name__ == "__main__":
    main()
