"""Several robots, one learner: 1, 2, 4 wall-clock sim drivers (separate processes) feeding one
``qc-robot serve`` + ``qc-robot finetune`` for the same total number of env steps.

Per N: env steps/s reaching the learner, its updates/s and whether it held UTD 1 (it says so in
its log when it cannot), per-robot steps and episodes (``run_dir/robots.csv``), and the success
of the result on the same evaluation seeds.

    OMP_NUM_THREADS=1 python benchmarks/e2e_multi_robot.py --checkpoint CKPT --onnx MODEL \
        --robots 1,2,4 --total-steps 1200 --episodes 20
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_common import background, run, stop, wilson  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--onnx", required=True, help="the checkpoint's exported policy")
    ap.add_argument("--out-dir", default="runs/e2e/multi_robot")
    ap.add_argument("--robots", default="1,2,4")
    ap.add_argument("--total-steps", type=int, default=1200)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per result (0: none)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--port", type=int, default=5731)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from qc_robot.train.checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    env_name = ck.config.env.name
    del ck
    rows = []
    for n in [int(x) for x in args.robots.split(",")]:
        tag = f"n{n}"
        run_dir, journal = out / f"ft_{tag}", out / f"journal_{tag}"
        for d in [run_dir, journal, *(out / f"outbox_{tag}_{i}" for i in range(n))]:
            shutil.rmtree(d, ignore_errors=True)
        drv, lrn = f"tcp://127.0.0.1:{args.port}", f"tcp://127.0.0.1:{args.port + 1}"
        server = background(["qc-robot", "serve", "--policy", args.onnx, f"bind={drv}", f"learner_bind={lrn}",
                             f"journal_dir={journal}", "threads=1", "providers=cpu", f"max_clients={n + 2}"],
                            out / f"serve_{tag}.log")
        time.sleep(3)
        ft = background(["qc-robot", "finetune", f"checkpoint={args.checkpoint}", f"server={lrn}",
                         f"run_dir={run_dir}", f"max_env_steps={args.total_steps}", "utd=1", "push_every=50",
                         "threads=1", "replay_capacity=20000", "log_interval=100",
                         f"max_wall_s={args.timeout - 60:.0f}"], out / f"finetune_{tag}.log")
        time.sleep(8)  # it loads the dataset and traces the graph before taking data
        t0 = time.monotonic()
        drives = [background(["qc-robot", "drive", "driver=sim", f"env={env_name}", f"server={drv}",
                              "episodes=10000", f"seed={10_000 * (i + 1)}", "send_transitions=true",
                              "realtime=true", f"time_scale={args.time_scale:g}",
                              f"outbox_dir={out / f'outbox_{tag}_{i}'}", "outbox_drain_s=2"],
                             out / f"drive_{tag}_{i}.log") for i in range(n)]
        try:
            ft.wait(args.timeout)
        finally:
            wall = time.monotonic() - t0
            for d in drives:
                stop(d)
            stop(ft)
            stop(server)
        log = (out / f"finetune_{tag}.log").read_text()
        m = re.search(r"done: (\d+) online updates, (\d+) env steps, (\d+) episodes \((\d+) successes\)", log)
        if m is None:
            raise RuntimeError(f"finetune N={n} did not finish:\n{log[-3000:]}")
        updates, steps = int(m.group(1)), int(m.group(2))
        behind = len(re.findall(r"updates behind its UTD target", log))
        with (run_dir / "robots.csv").open() as f:
            robots = list(csv.DictReader(f))
        k = n_eval = 0
        if args.episodes:
            txt, _ = run(["qc-robot", "eval", f"checkpoint={run_dir / 'checkpoint.pt'}", f"episodes={args.episodes}",
                          f"seed={args.seed}", "progress=false"], 1800, out / f"eval_{tag}.log")
            em = re.search(r"success ([\d.]+) over (\d+) episodes", txt)
            if em:
                n_eval = int(em.group(2))
                k = round(float(em.group(1)) * n_eval)
        rows.append(dict(n=n, steps=steps, updates=updates, wall=wall, behind=behind, k=k, n_eval=n_eval,
                         robots=" / ".join(f"{r['env_steps']} steps, {r['episodes']} ep" for r in robots)))

    print()
    print(f"{env_name}, {args.total_steps} env steps in total at UTD 1, wall-clock drivers at "
          f"{20 * args.time_scale:g} Hz each; wall s from the drivers' start to the learner's end.")
    print()
    print("| robots | env steps/s | updates/s | 'behind UTD' warnings | per robot | success | 95% Wilson CI |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = wilson(r["k"], r["n_eval"])
        succ = f"{r['k']}/{r['n_eval']}" if r["n_eval"] else "—"
        print(f"| {r['n']} | {r['steps'] / r['wall']:.1f} | {r['updates'] / r['wall']:.1f} | {r['behind']} "
              f"| {r['robots']} | {succ} | [{100 * lo:.0f}%, {100 * hi:.0f}%] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
