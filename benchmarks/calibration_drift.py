"""The drift check's matrix (issue 28): no alarm on fresh logs of unchanged robots, an alarm for
±10 % and ±20 % changes of each parameter. The "robots" are calibration_matrix.py's.

    python benchmarks/calibration_drift.py --robots 0 3 5                 # logs with simulator states
    python benchmarks/calibration_drift.py --robots 0 5 --stateless       # real-arm logs: no `states`
    python benchmarks/calibration_drift.py --robots 0 1 2 3 4 5 6 7 --fresh 6 --unchanged-only  # false alarms

For each robot: a realtime excitation log (``--episodes`` x ``--steps``, seed 100 + 10 i, as the
sysid matrix) is fitted with the ``step=sysid`` defaults (``identify``), and the fit saved as the
robot's calibration. Then fresh logs (new seeds) go through ``qc-robot calibrate step=check`` (the
CLI entry point; physics only): ``--fresh`` random excitations and one push log (``push_policy``:
the arm sweeps through the cube) of the unchanged robot, and one random excitation of the robot
with each change: kp, damping and armature x(1 + c) for c in ``--changes``, friction ±0.1 and
±0.2 N·m where that stays >= 0. ``--stateless`` deletes the MuJoCo ``states`` from every log
(what a real arm records). Printed: a markdown row per check (exit code, flagged parameters, the
refit's shift of each parameter), each fit's parameters and convergence, and the false-alarm count
on the unchanged logs with its one-sided 95 % upper bound. CPU only; run it niced beside other work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_matrix import KINDS, ROBOTS, TASK  # noqa: E402


def _strip_states(path: str) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        for name in f["data"]:
            if "states" in f["data"][name]:
                del f["data"][name]["states"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--robots", type=int, nargs="*", default=[0, 3, 5])
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--fresh", type=int, default=2, help="fresh random excitations of the unchanged robot")
    ap.add_argument("--changes", type=float, nargs="*", default=[-0.2, -0.1, 0.1, 0.2])
    ap.add_argument("--unchanged-only", action="store_true", help="only the unchanged robots' logs (false alarms)")
    ap.add_argument("--stateless", action="store_true")
    ap.add_argument("--global-evals", type=int, default=480, help="sysid's global stage (480: the default)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from qc_robot.calibration.cli import CalibrateConfig, run_calibrate
    from qc_robot.calibration.excitation import push_policy, record_excitation
    from qc_robot.calibration.files import Calibration, save_calibration
    from qc_robot.calibration.logs import load_trajectories
    from qc_robot.calibration.sysid import identify
    from qc_robot.drivers.sim import SimConfig, SimDriver

    rows: list[dict] = []
    fits: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        def log(params: dict[str, float], delay: int, name: str, seed: int, push: bool = False) -> str:
            robot = save_calibration(Calibration("hidden", TASK, physics={"params": params, "ranges": {},
                                                                          "control_delay_steps": delay}),
                                     Path(tmp) / "hidden.json")
            data = f"{tmp}/{name}.hdf5"
            driver = SimDriver(SimConfig(env=TASK, calibration=str(robot), time_scale=args.time_scale))
            try:
                record_excitation(driver, data, 1 if push else args.episodes, 100 if push else args.steps, seed=seed,
                                  env_args={"task": TASK}, time_scale=args.time_scale,
                                  policy=push_policy(np.random.default_rng(seed)) if push else None)
            finally:
                driver.close()
            if args.stateless:
                _strip_states(data)
            return data

        for i in args.robots:
            *vals, delay = ROBOTS[i]
            hidden = dict(zip(KINDS, vals, strict=True))
            t0, load0 = time.monotonic(), os.getloadavg()[0]
            data = log(hidden, delay, f"fit{i}", 100 + 10 * i)
            res = identify(TASK, load_trajectories(data, TASK, args.episodes, args.steps), KINDS, seed=i,
                           global_evals=args.global_evals)
            fit = {k: v for k, v in res.to_dict().items() if k not in ("params", "ranges", "control_delay_steps",
                                                                        "sigma")}
            cal = save_calibration(Calibration(f"robot{i}", TASK, physics={
                "params": res.params, "ranges": res.ranges, "control_delay_steps": res.delay_steps,
                "sigma": res.sigma, "fit": fit}), Path(tmp) / f"robot{i}.json")
            print(f"robot {i}: fit {res.params} error {res.error_after:.3g} converged {res.converged} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
            fits.append({"robot": i, "hidden": hidden, "fit": res.params, "error": res.error_after,
                         "converged": res.converged, "delay": [delay, res.delay_steps]})
            cases: list[tuple[str, dict[str, float], bool]] = [("unchanged", hidden, False)] * args.fresh
            cases.append(("unchanged, push (contact)", hidden, True))
            for k in ("kp", "damping", "armature"):
                cases += [(f"{k} {c:+.0%}", {**hidden, k: hidden[k] * (1 + c)}, False)
                          for c in ([] if args.unchanged_only else args.changes)]
            for dv in () if args.unchanged_only else (-0.2, -0.1, 0.1, 0.2):
                if hidden["frictionloss"] + dv >= 0:
                    cases.append((f"frictionloss {dv:+.1f} N·m", {**hidden, "frictionloss": hidden["frictionloss"] + dv},
                                  False))
            for j, (label, params, push) in enumerate(cases):
                data = log(params, delay, f"check{i}_{j}", 5000 + 100 * i + j, push)
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    rc = run_calibrate(CalibrateConfig(step="check", robot_id=f"robot{i}", task=TASK, dataset=data,
                                                       out=str(cal), driver="", episodes=args.episodes))
                text = buf.getvalue()
                shifts = {ln.split()[0]: ln.split("shift ")[1].split(" (")[0] for ln in text.splitlines()
                          if "shift " in ln and ln.split() and ln.split()[0] in KINDS}
                flagged = [ln.split()[0] for ln in text.splitlines()
                           if ln.startswith("  ") and ln.split() and ln.split()[0] in KINDS and "  DRIFT" in ln]
                row = {"robot": i, "case": label, "rc": rc, "flagged": flagged, "shifts": shifts,
                       "timing_drift": "check timing" in text and "DRIFT" in text.split("check timing")[-1][:200],
                       "stateless": args.stateless, "fit_converged": res.converged, "load": load0}
                if rc == 2:
                    row["error"] = text.strip().splitlines()[-1]
                rows.append(row)
                print(json.dumps(row), flush=True)
    _table(rows)
    _fits(fits)
    _false_alarms(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": rows, "fits": fits}, indent=1))


def _fits(fits: list[dict]) -> None:
    print("\n| robot | " + " | ".join(f"{k} (hidden, fit)" for k in KINDS) + " | delay | replay error | converged |")
    print("|---" * (len(KINDS) + 4) + "|")
    for f in fits:
        cells = [f"{f['hidden'][k]:g}, {f['fit'][k]:.4g}" for k in KINDS]
        print(f"| {f['robot']} | " + " | ".join(cells)
              + f" | {f['delay'][0]}, {f['delay'][1]} | {f['error']:.2g} | {'yes' if f['converged'] else 'NO'} |")


def _false_alarms(rows: list[dict]) -> None:
    from qc_robot.reward.check import binomial_upper  # one-sided Clopper-Pearson

    unchanged = [r for r in rows if r["case"].startswith("unchanged")]
    if unchanged:
        k = sum(r["rc"] != 0 for r in unchanged)
        print(f"\nunchanged robots: {len(unchanged)} fresh logs, {k} false alarms; one-sided 95 % upper bound "
              f"on the false-alarm rate: {binomial_upper(k, len(unchanged)):.1%}")


def _table(rows: list[dict]) -> None:
    print("\n| robot | fresh log of | exit | flagged | kp | damping | armature | frictionloss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        expect = 0 if r["case"].startswith("unchanged") else 1
        ok = "" if r["rc"] == expect else " (WRONG)"
        s = r["shifts"]
        print(f"| {r['robot']} | {r['case']} | {r['rc']}{ok} | {', '.join(r['flagged']) or '-'} | "
              + " | ".join(s.get(k, "") for k in KINDS) + " |")


if __name__ == "__main__":
    main()
