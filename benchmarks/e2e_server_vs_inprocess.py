"""Success of one policy through ``serve`` + the sim driver vs evaluated in-process (issue 4).

Same checkpoint, same task, same episode seeds (seed, seed+1, ...):

1. ``qc-robot export``: checkpoint → model.onnx (skipped if ``--onnx`` exists and ``--reuse``),
2. in-process, torch policy: ``qc-robot eval checkpoint=... episodes=N seed=S``,
3. in-process, the exported ONNX policy: ``OnnxPolicy`` + ``qc_robot.train.evaluate.evaluate``,
4. through the stack, lockstep: ``qc-robot serve`` (subprocess, loopback) +
   ``qc-robot drive driver=sim realtime=false seed=S episodes=N``,
5. through the stack, wall clock: the same with ``realtime=true time_scale=T`` for fewer episodes
   (held ticks and round-trip times reported).

The policy is stochastic (QC-FQL draws its actor noise per query; torch from a seeded generator,
ONNX in-graph), so arms agree in distribution, not episode by episode. Success rates get 95%
Wilson intervals and a two-proportion z-test against the torch in-process arm.

    OMP_NUM_THREADS=1 python benchmarks/e2e_server_vs_inprocess.py \
        --checkpoint /work/runs/offline_ckpts/cube-single-task1-qc_fql/checkpoint.pt \
        --out-dir /work/runs/e2e [--episodes 50] [--seed 1000] [--rt-episodes 10] [--port 5571]

Every subprocess has a timeout and the server is stopped on exit (also on errors / Ctrl-C).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e_common import background, run, stop, two_prop_p, wilson  # noqa: E402 (after the path set-up)


def start_server(onnx: str, port: int, log_path: Path) -> subprocess.Popen:
    return background(["qc-robot", "serve", "--policy", onnx, f"bind=tcp://127.0.0.1:{port}", "threads=1",
                       "providers=cpu", "log_level=WARNING"], log_path)


def parse_drive(out: str) -> dict:
    eps = re.findall(r"episode \d+/\d+: (success|failure)\s+steps (\d+) \(robot (\d+)\)\s+chunks (\d+)\s+held (\d+)"
                     r"\s+rtt p50 ([\d.]+|n/a)", out)
    m = re.search(r"success (\d+)/(\d+)", out.splitlines()[-1] if out.strip() else "")
    tail = [ln for ln in out.splitlines() if ln.startswith("success ")]
    m = re.search(r"success (\d+)/(\d+).*requests (\d+)\s+timeouts (\d+).*held (\d+)", tail[-1])
    rtts = [float(e[5]) for e in eps if e[5] != "n/a"]
    return dict(k=int(m.group(1)), n=int(m.group(2)), requests=int(m.group(3)), timeouts=int(m.group(4)),
                held=int(m.group(5)), steps=sum(int(e[1]) for e in eps), robot_steps=sum(int(e[2]) for e in eps),
                rtt_p50_median=(sorted(rtts)[len(rtts) // 2] if rtts else float("nan")),
                rtt_p50_max=max(rtts) if rtts else float("nan"),
                per_episode=[e[0] == "success" for e in eps], summary=tail[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out-dir", default="runs/e2e")
    ap.add_argument("--onnx", default="", help="default: OUT_DIR/model.onnx")
    ap.add_argument("--reuse", action="store_true", help="reuse an existing --onnx instead of exporting")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--rt-episodes", type=int, default=10)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=5571)
    ap.add_argument("--skip", default="", help="comma list of arms to skip: torch,onnx,lockstep,realtime")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx = args.onnx or str(out_dir / "model.onnx")
    n, seed = args.episodes, args.seed
    rows: list[tuple[str, int, int, str, float]] = []  # name, k, n, notes, wall
    ckpt_cfg = None

    if not (args.reuse and Path(onnx).exists()):
        run(["qc-robot", "export", f"checkpoint={args.checkpoint}", f"out={onnx}"], 600)

    if "torch" not in skip:
        t0 = time.monotonic()
        out, _ = run(["qc-robot", "eval", f"checkpoint={args.checkpoint}", f"episodes={n}", f"seed={seed}",
                   "progress=false"], 1800)
        m = re.search(r"success ([\d.]+) over (\d+) episodes.*?(\d+) policy queries", out)
        k = round(float(m.group(1)) * int(m.group(2)))
        rows.append(("in-process, torch policy (`qc-robot eval`)", k, int(m.group(2)),
                     f"{m.group(3)} queries", time.monotonic() - t0))

    if "onnx" not in skip:
        import torch

        torch.set_num_threads(1)
        from qc_robot.policies.onnx_policy import OnnxPolicy
        from qc_robot.train.checkpoint import load_checkpoint
        from qc_robot.train.evaluate import evaluate

        ckpt_cfg = load_checkpoint(args.checkpoint).config
        pol = OnnxPolicy(onnx, providers="cpu", threads=1)
        key = pol.meta.obs_fields[0].key
        t0 = time.monotonic()
        print(f"# in-process ONNX evaluate(): {n} episodes, seeds {seed}..{seed + n - 1}", flush=True)
        res = evaluate(lambda obs: pol.predict({key: obs.astype("float32")}).actions, ckpt_cfg.env.name, n, seed,
                       ckpt_cfg.env.sparse_reward, ckpt_cfg.env.max_episode_steps)
        rows.append(("in-process, exported ONNX (`OnnxPolicy` + `evaluate`)", round(res.success_rate * n), n,
                     f"{res.policy_queries} queries, mean length {res.mean_length:.0f}", time.monotonic() - t0))

    env_name = ckpt_cfg.env.name if ckpt_cfg is not None else None
    if env_name is None:
        from qc_robot.train.checkpoint import load_checkpoint

        env_name = load_checkpoint(args.checkpoint).config.env.name
    drive_base = ["qc-robot", "drive", "driver=sim", f"env={env_name}", f"server=tcp://127.0.0.1:{args.port}",
                  f"seed={seed}", "send_transitions=false"]
    rt = None
    if not {"lockstep", "realtime"} <= skip:
        server = start_server(onnx, args.port, out_dir / "serve_e2e.log")
        try:
            if "lockstep" not in skip:
                t0 = time.monotonic()
                out, _ = run(drive_base + [f"episodes={n}", "realtime=false"], 1800)
                (out_dir / "drive_lockstep.log").write_text(out)
                d = parse_drive(out)
                rows.append(("server + sim driver, lockstep (`realtime=false`)", d["k"], d["n"],
                             f"{d['requests']} requests, {d['timeouts']} timeouts, held {d['held']}",
                             time.monotonic() - t0))
            if "realtime" not in skip:
                t0 = time.monotonic()
                out, _ = run(drive_base + [f"episodes={args.rt_episodes}", "realtime=true",
                                        f"time_scale={args.time_scale}"],
                          60 + 30 * args.rt_episodes / args.time_scale)
                (out_dir / "drive_realtime.log").write_text(out)
                rt = parse_drive(out)
                rows.append((f"server + sim driver, wall clock (`realtime=true time_scale={args.time_scale:g}`)",
                             rt["k"], rt["n"], f"{rt['requests']} requests, {rt['timeouts']} timeouts, "
                             f"held {rt['held']}/{rt['robot_steps']} robot steps, rtt p50 (median over "
                             f"episodes) {rt['rtt_p50_median']:.1f} ms", time.monotonic() - t0))
        finally:
            stop(server)

    ref = rows[0] if rows else None
    print()
    print(f"Policy `{onnx}` from `{args.checkpoint}`; task {env_name}; seeds {seed}..{seed + n - 1}.")
    print()
    print("| arm | success | rate | 95% Wilson CI | p vs first row | notes | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, k, nn, notes, wall in rows:
        lo, hi = wilson(k, nn)
        p = two_prop_p(k, nn, ref[1], ref[2]) if ref is not None and (name, k) != ref[:2] else float("nan")
        ps = "—" if math.isnan(p) else f"{p:.2f}"
        print(f"| {name} | {k}/{nn} | {100 * k / nn:.0f}% | [{100 * lo:.0f}%, {100 * hi:.0f}%] | {ps} | {notes} "
              f"| {wall:.0f} |")
    if rt is not None:
        print()
        print(f"wall-clock run: {rt['summary']}; per-episode rtt p50 median {rt['rtt_p50_median']:.1f} ms, "
              f"max {rt['rtt_p50_max']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
