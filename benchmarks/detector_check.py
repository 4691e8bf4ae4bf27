"""The success detector's false-positive rate on episodes it never saw, from the policies it
judges during fine-tuning (issue 24: "at or below 2% per episode on held-out episodes").

Reads an out-dir of ``finetune_robot_time.py``. For the offline policy and each fine-tuning
checkpoint named (exported to ONNX), records --episodes fresh episodes on the blind sim through
``serve`` (``log_dir``) + ``drive``, each judged by the scripted operator from the sim's hidden
outcome (no detector: the verdicts are the truth), on seeds no other stage used. By default the
operator only judges (--takeovers 0): a failure is then the policy's own, and there are many to
count false fires in (with takeovers most episodes of these policies succeed). Then
``qc-robot reward FILES check=DETECTOR`` measures each detector on them, per policy and pooled:
per-episode false-positive rate (fires in failed episodes) with its one-sided 95% upper bound,
early fires (successes it fires on before they happen: on the robot these end the episode as a
false success too), the two together per episode (what an operator reviewing fires sees), recall,
and the same over a sweep of thresholds.

    OMP_NUM_THREADS=1 python benchmarks/detector_check.py --out-dir runs/robot_time \\
        --checkpoints a/ckpt_10min.pt,a/ckpt_20min.pt --episodes 150 --detectors reward.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e_common import background, run, stop  # noqa: E402 (after the path set-up)


def record(args: argparse.Namespace, onnx: Path, d: Path, seed: int) -> list[Path]:
    """--episodes episodes of ``onnx`` on the blind sim, judged by the scripted operator, logged
    by the server into ``d``; reused when ``d`` holds them."""
    if list(d.glob("*.hdf5")):
        return sorted(d.glob("*.hdf5"))
    server = background(["qc-robot", "serve", "--policy", str(onnx), f"bind=tcp://127.0.0.1:{args.port}",
                         f"log_dir={d}", "threads=1", "providers=cpu"], d.with_suffix(".serve.log"))
    time.sleep(3)
    try:
        run(["qc-robot", "drive", "driver=sim", f"env={args.task}", f"server=tcp://127.0.0.1:{args.port}",
             f"episodes={args.episodes}", f"seed={seed}", f"realtime={str(args.realtime).lower()}", "blind=true",
             "operator=scripted",
             f"operator_args.noise={args.noise:g}", f"operator_args.max_takeovers={args.takeovers}",
             "env.sparse_reward=true"], 7200, d.with_suffix(".drive.log"))
    finally:
        stop(server)
    return sorted(d.glob("*.hdf5"))


def check(detector: Path, files: list[Path], report: Path) -> dict:
    if not report.exists() or json.loads(report.read_text())["data"] != list(map(str, files)):
        run(["qc-robot", "reward", *map(str, files), f"check={detector}", f"report={report}"], 1800,
            report.with_suffix(".log"))
    return json.loads(report.read_text())


def at(r: dict, threshold: float) -> dict:
    """The per-episode rates of check report ``r`` at ``threshold`` (one of its sweep)."""
    got = [s for s in r["episode_sweep"] if abs(s["threshold"] - threshold) < 1e-9]
    if not got:
        raise SystemExit(f"threshold {threshold} is not in the check's sweep {[s['threshold'] for s in r['episode_sweep']]}")
    return got[0]


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def row(name: str, r: dict, threshold: float) -> str:
    e = at(r, threshold)
    return (f"| {name} | {r['episodes']} | {r['successes']} | {e['fp']} / {r['episodes'] - r['successes']} | "
            f"{pct(e['fpr'])} | {pct(e['fpr_upper95'])} | {e['early_fires']} / {r['successes']} | "
            f"{pct((e['fp'] + e['early_fires']) / r['episodes'])} | {pct(e['recall'])} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs/robot_time")
    ap.add_argument("--checkpoints", default="a/ckpt_10min.pt,a/ckpt_20min.pt",
                    help="fine-tuning checkpoints (relative to --out-dir) whose episodes to judge, beside the offline policy")
    ap.add_argument("--detectors", default="reward.onnx", help="detectors to check (relative to --out-dir)")
    ap.add_argument("--threshold", type=float, default=0.99, help="the threshold the arms ran the detector at")
    ap.add_argument("--episodes", type=int, default=150, help="episodes per policy")
    ap.add_argument("--seed", type=int, default=900_000, help="first seed (no other stage uses 900000 and up)")
    ap.add_argument("--takeovers", type=int, default=0, help="the scripted operator's takeovers an episode")
    ap.add_argument("--realtime", action="store_true",
                    help="record on the 20 Hz wall clock, as the arms run (lockstep by default: faster)")
    ap.add_argument("--skip-offline", action="store_true", help="only the checkpoints' episodes")
    ap.add_argument("--task", default="cube-single-task1")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--port", type=int, default=5581)
    args = ap.parse_args()
    out = Path(args.out_dir)
    d = out / "check"
    d.mkdir(exist_ok=True)
    tag = f"t{args.takeovers}" + ("_rt" if args.realtime else "")  # recordings and reports kept apart

    policies: list[tuple[str, Path]] = [("offline", out / "model.onnx")]
    for c in [c for c in args.checkpoints.split(",") if c]:
        ckpt = out / c
        onnx = d / (ckpt.parent.name + "_" + ckpt.stem + ".onnx")
        if not onnx.exists():
            run(["qc-robot", "export", f"checkpoint={ckpt}", f"out={onnx}"], 600, onnx.with_suffix(".export.log"))
        policies.append((f"{ckpt.parent.name}/{ckpt.stem}", onnx))
    files = {name: record(args, onnx, d / f"{name.replace('/', '_')}_{tag}", args.seed + 10_000 * i)
             for i, (name, onnx) in enumerate(policies)  # a policy's seeds do not depend on --skip-offline
             if not (args.skip_offline and name == "offline")}

    for det in [out / x for x in args.detectors.split(",") if x]:
        print(f"\n{det.name} at threshold {args.threshold:g} (debounce as stored), on episodes of each policy and pooled:\n")
        print("| episodes of | episodes | successes | false fires / failed episodes | FPR | 95% upper | "
              "early fires / successes | any false fire, per episode | recall |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, fs in files.items():
            print(row(name, check(det, fs, d / f"{det.stem}_{name.replace('/', '_')}_{tag}.json"),
                      args.threshold))
        pooled = check(det, [f for fs in files.values() for f in fs], d / f"{det.stem}_pooled_{tag}.json")
        print(row("all", pooled, args.threshold))
        if pooled["trained_on_these_files"]:
            print(f"(not held out: it trained on {pooled['trained_on_these_files']})")
        failed = pooled["episodes"] - pooled["successes"]
        print("\npooled, by threshold: " + ", ".join(
            f"{s['threshold']:g}: fpr {s['fp']}/{failed} (<= {pct(s['fpr_upper95'])}), recall {pct(s['recall'])}"
            for s in pooled["episode_sweep"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
