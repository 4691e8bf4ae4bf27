"""Fine-tuning env steps/s with ``fleet robots=1`` and ``robots=2`` against one ``serve`` + one
``finetune``, as ratios to a single ``drive`` in the same run.

    python benchmarks/bench_cluster_finetune.py [--env-steps 300] [--repeats 2] [--max-steps 100]

Makes a throwaway checkpoint (QC-FQL, ``experiment=cpu_small``'s 3x256 networks, one offline
update: the learner's cost does not depend on its weights) and its ONNX export, then, repeat by
repeat and path by path (interleaved), starts a fresh ``serve`` with a learner port and journal,
a fresh ``finetune`` (UTD 1, push every 50, ``max_env_steps``), waits until the learner has
subscribed (its log says so), and starts the robots: one lockstep sim ``drive`` (realtime=false,
with an outbox, as a fleet robot has), or ``fleet robots=N`` (its own local Ray instance, each
robot a lockstep ``drive`` in an actor). Every process runs with 1 thread (``e2e_common.ENV``).

Per run: **end to end** = env steps trained / seconds from the robots' start to the learner's
exit (a fleet's Ray start-up and actor start-up are inside, as in a real ``fleet`` call); **steady**
= the learner's updates/s between its first and last periodic log line (at UTD 1, env steps
trained per second once data flows); the slowest 20-update window of that span is reported too.
Rows: median over repeats; ratio = that over the ``drive`` median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_common import ENV, background, stop  # noqa: E402

TASK = "cube-single-task1"
LOG_INTERVAL = 20
CLI = [sys.executable, "-m", "qc_robot.cli"]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO .*updates (\d+)  env steps (\d+)")
DONE = re.compile(r"done: (\d+) online updates, (\d+) env steps")


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _cli(args: list[str], log: Path) -> None:
    r = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=900)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``path`` until ``pattern`` appears (the learner's readiness line)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pattern in path.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: exited {proc.returncode} before {pattern!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{path.name}: no {pattern!r} within {timeout:.0f} s")


def _windows(log: str) -> tuple[float, float]:
    """(steady updates/s over the logged span, slowest window's) from the periodic log lines."""
    marks = [(dt.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(u))
             for t, u, _ in (m.groups() for m in map(LINE.match, log.splitlines()) if m)]
    if len(marks) < 2:
        return math.nan, math.nan
    rates = [(u1 - u0) / max(t1 - t0, 1e-3) for (t0, u0), (t1, u1) in zip(marks, marks[1:], strict=False)]
    return (marks[-1][1] - marks[0][1]) / max(marks[-1][0] - marks[0][0], 1e-3), min(rates)


def one_run(path: str, robots: int, tag: str, port: int, tmp: Path, ckpt: Path, onnx: Path,
            args: argparse.Namespace) -> dict[str, float]:
    d = tmp / tag
    d.mkdir()
    drv, lrn = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    server = background([*CLI, "serve", f"policy={onnx}", f"bind={drv}", f"learner_bind={lrn}",
                         f"journal_dir={d / 'journal'}", "threads=1", "providers=cpu", "max_clients=8"],
                        d / "serve.log")
    ft_log = d / "finetune.log"
    ft = background([*CLI, "finetune", f"checkpoint={ckpt}", f"server={lrn}", f"run_dir={d / 'ft'}",
                     f"max_env_steps={args.env_steps}", "utd=1", "push_every=50", "threads=1",
                     "replay_capacity=20000", f"log_interval={LOG_INTERVAL}", "save_every=0",
                     "max_wall_s=600"], ft_log)
    robot_procs = []
    try:
        _wait_for(ft_log, "subscribed to", ft, 300)
        # enough episodes for the learner's steps and one more each; they end on their own after it
        episodes = math.ceil(args.env_steps / (robots * args.max_steps)) + 1
        drive = ["driver=sim", f"env={TASK}", f"server={drv}", "realtime=false", f"episodes={episodes}",
                 f"max_steps={args.max_steps}", "outbox_drain_s=5"]
        t0 = time.monotonic()
        if path == "drive":
            robot_procs.append(background([*CLI, "drive", *drive, f"outbox_dir={d / 'outbox'}"], d / "robots.log"))
        else:
            robot_procs.append(background([*CLI, "fleet", f"robots={robots}", *drive, f"fleet_dir={d / 'fleet'}"],
                                          d / "robots.log"))
        ft.wait(660)
        wall = time.monotonic() - t0
        for p in robot_procs:  # they finish their last episode without a learner to wait for
            p.wait(180)
    finally:
        for p in [*robot_procs, ft, server]:
            stop(p)
    log = ft_log.read_text()
    m = DONE.search(log)
    if m is None:
        raise RuntimeError(f"{tag}: the learner did not finish:\n{log[-3000:]}")
    steps = int(m.group(2))
    steady, slowest = _windows(log)
    return {"steps": steps, "wall": wall, "e2e": steps / wall, "steady": steady, "slowest": slowest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env-steps", type=int, default=300, help="finetune max_env_steps of each run")
    ap.add_argument("--max-steps", type=int, default=100, help="steps per robot episode")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=5761)
    args = ap.parse_args()

    import ray
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_ft_"))
    data = tmp / "d.hdf5"
    _cli(["datagen", f"env={TASK}", "data.num_episodes=2", "data.episode_length=100", f"data.path={data}",
          "progress=false"], tmp / "datagen.log")
    run = tmp / "run"
    _cli(["train", "agent=qc_fql", "experiment=cpu_small", f"data.path={data}", f"training.run_dir={run}",
          "training.offline_steps=1", "training.online_steps=0", "training.eval_episodes=0",
          "training.progress=false", "agent.device=cpu"], tmp / "train.log")
    ckpt, onnx = run / "checkpoint.pt", tmp / "model.onnx"
    _cli(["export", f"checkpoint={ckpt}", f"out={onnx}"], tmp / "export.log")

    paths = [("drive", 1), ("fleet x1", 1), ("fleet x2", 2)]
    results: dict[str, list[dict[str, float]]] = {p: [] for p, _ in paths}
    load_before, n = _load(), 0
    for rep in range(args.repeats):
        for name, robots in paths:
            r = one_run(name.split()[0], robots, f"r{rep}_{name.replace(' ', '')}", args.port + 2 * n, tmp, ckpt,
                        onnx, args)
            n += 1
            results[name].append(r)
            print(f"repeat {rep + 1}/{args.repeats} {name}: {r['steps']} env steps in {r['wall']:.1f} s "
                  f"({r['e2e']:.1f}/s end to end, {r['steady']:.1f} updates/s steady, slowest window "
                  f"{r['slowest']:.1f})", flush=True)
    load_after = _load()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base_e2e, base_steady = med("drive", "e2e"), med("drive", "steady")
    rows = [f"| {name} | {med(name, 'e2e'):.1f} | {min(r['e2e'] for r in results[name]):.1f} | "
            f"{med(name, 'e2e') / base_e2e:.2f} | {med(name, 'steady'):.1f} | "
            f"{min(r['slowest'] for r in results[name]):.1f} | {med(name, 'steady') / base_steady:.2f} |"
            for name, _ in paths]
    walls = "; ".join(f"{name}: " + " / ".join(f"{r['wall']:.1f}" for r in results[name]) for name, _ in paths)
    lines = [
        "# Fine-tuning on a fleet: env steps/s",
        "",
        f"Machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"ray {ray.__version__}, python {platform.python_version()}; `{Path(__file__).name} --env-steps "
        f"{args.env_steps} --max-steps {args.max_steps} --repeats {args.repeats}`.",
        "",
        f"{TASK}, QC-FQL 3x256 (cpu_small) learner at UTD 1, push every 50, {args.env_steps} env steps per run; "
        f"lockstep sim robots ({args.max_steps}-step episodes, learner_wait 200); every process 1 thread.",
        "",
        "| path | end to end env steps/s (median) | (slowest run) | ratio to drive | steady updates/s "
        "(median) | slowest 20-update window | ratio to drive |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Wall s per run (robots' start to the learner's exit): {walls}.",
        f"Load average (1, 5, 15 min) before / after: {load_before} | {load_after}.",
    ]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
