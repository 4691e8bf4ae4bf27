"""Evaluation episodes/s on Ray actors (``eval workers=N``) against the sequential path, same run.

    python benchmarks/bench_cluster_eval.py [--episodes 8] [--steps 100] [--repeats 3]
                                            [--workers 1 2] [--out docs/benchmarks_cluster.md]

Trains a throwaway checkpoint at the reference network size (critic and actor 4x512, 1 update on
a small play dataset: the policy's cost does not depend on its weights), then times, interleaved
repeat by repeat: the sequential in-process path (``evaluate``: what ``eval workers=1`` runs), the
same with torch limited to 1 thread (what each 1-CPU Ray actor gets), and
:func:`qc_robot.ray_pool.run_tasks` with 1 and 2 actors. One local Ray instance serves every
repeat (its start-up is reported on its own); each Ray repeat starts its actors afresh, so actor
start-up (import torch, load the checkpoint, make the env) is inside the timed span, as in a real
``eval workers=N`` call. Every Ray repeat's per-episode outcomes are checked against the
sequential ones. Episodes/s = episodes / median run time; ratio = that over the sequential median.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

TASK = "cube-single-task1"


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100, help="env.max_episode_steps of each episode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import ray
    import torch

    from qc_robot.cli import main as cli
    from qc_robot.ray_pool import run_tasks
    from qc_robot.sim.datagen import generate
    from qc_robot.train.checkpoint import load_checkpoint
    from qc_robot.train.evaluate import CheckpointEpisodes, agent_policy, evaluate

    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    data = generate(TASK, 2, 60, 0.1, 0, str(tmp / "d.hdf5"), progress=False)
    run = tmp / "run"
    assert cli(["train", f"data.path={data}", f"training.run_dir={run}", "training.offline_steps=1",
                "training.online_steps=0", "training.eval_episodes=0", "training.progress=false",
                "agent.device=cpu"]) == 0
    ckpt_path = run / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    env = ckpt.config.env
    seed, n = 1000, args.episodes
    job = CheckpointEpisodes(str(ckpt_path), env.name, seed, env.sparse_reward, args.steps)
    load_before = _load()

    t = time.perf_counter()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level=logging.ERROR, configure_logging=False)
    ray_start = time.perf_counter() - t

    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {"sequential": [], "sequential, 1 torch thread": [],
                                     **{f"ray x{w}": [] for w in args.workers}}
    reference = None
    steps = 0
    for rep in range(args.repeats):
        t = time.perf_counter()
        res = evaluate(agent_policy(ckpt.agent, seed), env.name, n, seed, env.sparse_reward, args.steps)
        times["sequential"].append(time.perf_counter() - t)
        reference = reference or res.outcomes
        assert res.outcomes == reference
        steps = sum(o.length for o in res.outcomes)
        torch.set_num_threads(1)  # what a Ray actor of 1 CPU gets (Ray sets OMP_NUM_THREADS=1 there)
        t = time.perf_counter()
        res = evaluate(agent_policy(ckpt.agent, seed), env.name, n, seed, env.sparse_reward, args.steps)
        times["sequential, 1 torch thread"].append(time.perf_counter() - t)
        torch.set_num_threads(threads)
        assert res.outcomes == reference
        for w in args.workers:
            t = time.perf_counter()
            got = run_tasks(job, n, w)
            times[f"ray x{w}"].append(time.perf_counter() - t)
            assert got == reference, f"ray x{w} differs from the sequential outcomes"
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)
    ray.shutdown()
    load_after = _load()

    base = statistics.median(times["sequential"])
    rows = []
    for k, v in times.items():
        med = statistics.median(v)
        rows.append(f"| {k} | {n / med:.2f} | {n / max(v):.2f} | {steps / med:.0f} | {base / med:.2f} |")
    lines = [
        "# Evaluation on Ray actors: episodes/s",
        "",
        f"Machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"ray {ray.__version__}, python {platform.python_version()}; `{Path(__file__).name} --episodes {n} "
        f"--steps {args.steps} --repeats {args.repeats}`.",
        "",
        f"{n} episodes of {TASK} ({steps} env steps per run, {args.steps} steps each), reference-size QC "
        f"policy (4x512, N 32, 10 flow steps), CPU; 'sequential' is `evaluate` in this process with torch's "
        f"{threads} threads, as `eval workers=1` runs it. Each Ray run starts its actors afresh (their start-up "
        f"is timed); the local Ray instance itself took {ray_start:.1f} s to start (not in the rows). "
        "Every Ray run's per-episode outcomes equalled the sequential run's.",
        "",
        "| path | episodes/s (median) | episodes/s (slowest run) | env steps/s | ratio to sequential |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Load average (1, 5, 15 min) before / after: {load_before} | {load_after}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
