"""A short learning run on a visual task, CPU-sized: OGBench's visual-cube-single-task1 with 64x64
camera images, recorded by ``datagen`` (render_fast), QC-FQL trained offline from state + image and,
as the baseline in the same run on the same file, from the state alone; both evaluated in sim
(the image agent sees the rendered camera). Every stage is a library call the CLI makes.

    python benchmarks/image_learning_run.py --out runs/visual --episodes 10 --length 200 --updates 1500

Phases can be run separately (each well under 10 minutes on 2 cores): --phase data|image|state|eval.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TASK = "visual-cube-single-task1"


def overrides(args: argparse.Namespace, data: Path, run: Path, keys: str) -> list[str]:
    return ["experiment=cpu_small", "agent=qc_fql", f"env.name={TASK}", f"data.path={data}",
            f"data.obs_keys={keys}", f"training.run_dir={run}", f"training.offline_steps={args.updates}",
            "training.online_steps=0", "training.eval_episodes=0", "training.log_interval=100",
            "training.progress=false", f"agent.batch_size={args.batch}", "agent.device=cpu",
            f"training.threads={args.threads}", "env.render_fast=true"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/visual"))
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--phase", choices=["data", "image", "state", "eval", "all"], default="all")
    args = p.parse_args()
    from qc_robot.cli import compose
    from qc_robot.sim.datagen import generate
    from qc_robot.train.checkpoint import load_checkpoint
    from qc_robot.train.evaluate import agent_policy, eval_image_size, evaluate
    from qc_robot.train.learner import CHECKPOINT, train

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "visual-cube-single-task1.hdf5"
    log = args.out / "summary.jsonl"

    def note(**kw: object) -> None:
        kw["load"] = os.getloadavg()[0]
        print(json.dumps(kw), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(kw) + "\n")

    if args.phase in ("data", "all"):
        t0 = time.time()
        generate(TASK, num_episodes=args.episodes, episode_length=args.length, noise=0.1, seed=0,
                 out_path=str(data), progress=False, task_goal_prob=0.5, image_size=64, render_fast=True)
        note(phase="data", episodes=args.episodes, length=args.length, seconds=time.time() - t0)
    for arm, keys in (("image", "[state,image]"), ("state", "[state]")):
        if args.phase in (arm, "all"):
            t0 = time.time()
            train(compose("train", overrides(args, data, args.out / arm, keys)))
            note(phase=arm, updates=args.updates, seconds=time.time() - t0,
                 updates_per_s=args.updates / (time.time() - t0))
    if args.phase in ("eval", "all"):
        for arm in ("image", "state"):
            if not (args.out / arm / CHECKPOINT).exists():
                print(f"no {arm} checkpoint: run --phase {arm} first")
                continue
            ckpt = load_checkpoint(args.out / arm / CHECKPOINT, device="cpu")
            t0 = time.time()
            r = evaluate(agent_policy(ckpt.agent, 1000), TASK, args.eval_episodes, 1000,
                         image_size=eval_image_size(ckpt.agent), render_fast=True)
            note(phase=f"eval-{arm}", success=r.success_rate, episodes=r.episodes, mean_return=r.mean_return,
                 mean_length=r.mean_length, seconds=time.time() - t0)


if __name__ == "__main__":
    main()
