"""Online fine-tuning through serve + the MuJoCo driver vs the in-process online loop (issue 5).

Both arms start from the same offline checkpoint and take the same number N of online env steps
at UTD 1; then each result is evaluated with ``qc-robot eval`` on the same seeds.

* ``inprocess``: the checkpoint is copied into a fresh run dir and ``qc-robot train`` resumes it
  with ``training.offline_steps=<its step> training.online_steps=N`` and the checkpoint's own
  agent/env/data settings (every leaf of its stored config passed as an override).
* ``stack``: ``qc-robot serve`` (learner port + fresh journal) + ``qc-robot finetune
  max_env_steps=N utd=1 push_every=P`` + ``qc-robot drive driver=sim send_transitions=true
  realtime=true time_scale=T`` (T = 1: the robot's 20 Hz wall clock). The driver is stopped
  when the learner finishes.
* ``lockstep``: the same stack with ``drive realtime=false pace_every=H`` and ``finetune
  push_every=H`` (H the chunk length): each chunk is acted by the policy trained on every step
  before it, the in-process loop's staleness.

    OMP_NUM_THREADS=1 python benchmarks/e2e_finetune_compare.py \
        --checkpoint /work/runs/offline_ckpts/cube-single-task1-qc_fql/checkpoint.pt \
        --out-dir /work/runs/e2e/finetune --steps 3000 --time-scale 0.5 [--arms inprocess,stack,offline]

Everything runs single-threaded, every step has a timeout, background processes are killed on
exit. Prints a markdown table (offline row only with the ``offline`` arm).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e_common import background, run, stop, wilson  # noqa: E402 (after the path set-up)


def evaluate(ckpt: Path, episodes: int, seed: int, log: Path) -> tuple[int, int, int]:
    out, _ = run(["qc-robot", "eval", f"checkpoint={ckpt}", f"episodes={episodes}", f"seed={seed}",
                  "progress=false"], 1800, log)
    m = re.search(r"success ([\d.]+) over (\d+) episodes.*at update (\d+)", out)
    n = int(m.group(2))
    return round(float(m.group(1)) * n), n, int(m.group(3))


def hydra_value(v) -> str:  # noqa: ANN001 (a config leaf)
    """A config leaf in Hydra's override grammar: strings quoted (paths may hold ',' or spaces)."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def leaf_overrides(obj, prefix: str) -> list[str]:  # noqa: ANN001 (a config dataclass)
    """``prefix.key=value`` for every leaf of ``obj``, nested dataclasses (agent.vision) by their
    own leaves: a nested config as one value (``agent.vision=VisionConfig(...)``) is no override."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += leaf_overrides(v, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}={hydra_value(v)}")
    return out


def config_overrides(cfg) -> list[str]:  # noqa: ANN001 (TrainConfig)
    """Every leaf of the checkpoint's agent/env/data config as a Hydra override."""
    return [o for group in ("agent", "env", "data") for o in leaf_overrides(getattr(cfg, group), f"{group}.")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out-dir", default="runs/e2e/finetune")
    ap.add_argument("--onnx", default="", help="the checkpoint's exported policy (default: export it)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--push-every", type=int, default=50)
    ap.add_argument("--start-updates", type=int, default=0, help="env steps before online updates (both arms)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="wall-clock stack arm: 1 = 20 Hz")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000, help="first eval seed")
    ap.add_argument("--drive-seed", type=int, default=0, help="first training-episode seed of the driver")
    ap.add_argument("--port", type=int, default=5581, help="driver port; the learner port is port+1")
    ap.add_argument("--arm-timeout", type=float, default=1200)
    ap.add_argument("--agent-group", default="qc_fql", help="configs/agent group of the checkpoint (its leaves are "
                    "overridden from the stored config anyway)")
    ap.add_argument("--arms", default="inprocess,lockstep,stack",
                    help="comma list of offline,inprocess,lockstep (stack, robot paced to the learner),stack (wall clock)")
    args = ap.parse_args()
    arms = args.arms.split(",")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_steps = args.steps

    import torch

    torch.set_num_threads(1)
    from qc_robot.train.checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    cfg, offline_step = ck.config, ck.step
    del ck
    rows: list[dict] = []

    if "offline" in arms:
        k, n, step = evaluate(Path(args.checkpoint), args.episodes, args.seed, out / "eval_offline.log")
        rows.append(dict(arm="offline checkpoint", k=k, n=n, updates=step, env_steps=0, wall=0.0, pushes="—",
                         cmd=f"qc-robot eval checkpoint={args.checkpoint} episodes={args.episodes} seed={args.seed}"))

    if "inprocess" in arms:
        run_dir = out / "inprocess"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.copy(args.checkpoint, run_dir / "checkpoint.pt")
        cmd = (["qc-robot", "train", "experiment=cpu_small", f"agent={args.agent_group}"] + config_overrides(cfg)
               + [f"training.run_dir={run_dir}", "training.resume=true", f"training.offline_steps={offline_step}",
                  f"training.online_steps={n_steps}", "training.utd=1", "training.eval_interval=0",
                  f"training.start_online_updates={args.start_updates}",
                  "training.eval_episodes=0", "training.save_interval=0", "training.threads=1",
                  "training.progress=false", "training.log_interval=250", f"training.seed={cfg.training.seed}"])
        _, wall = run(cmd, args.arm_timeout, out / "train_inprocess.log")
        done = load_checkpoint(run_dir / "checkpoint.pt")  # `train` prints no counts without an eval
        updates, env_steps = done.step - offline_step, done.env_steps
        del done
        k, n, step = evaluate(run_dir / "checkpoint.pt", args.episodes, args.seed, out / "eval_inprocess.log")
        rows.append(dict(arm="in-process online loop (`qc-robot train` resume)", k=k, n=n,
                         updates=updates, env_steps=env_steps, wall=wall, pushes="—",
                         cmd=" ".join(cmd)))

    for arm in [a for a in arms if a in ("lockstep", "stack")]:
        lockstep = arm == "lockstep"
        push_every = cfg.agent.horizon if lockstep else args.push_every
        run_dir, journal = out / arm, out / f"{arm}_journal"
        for d in (run_dir, journal):
            shutil.rmtree(d, ignore_errors=True)
        onnx = args.onnx or str(out / "model.onnx")
        if not Path(onnx).exists():
            run(["qc-robot", "export", f"checkpoint={args.checkpoint}", f"out={onnx}"], 600, out / "export.log")
        drv, lrn = f"tcp://127.0.0.1:{args.port}", f"tcp://127.0.0.1:{args.port + 1}"
        serve_cmd = ["qc-robot", "serve", "--policy", onnx, f"bind={drv}", f"learner_bind={lrn}",
                     f"journal_dir={journal}", "threads=1", "providers=cpu"]
        ft_cmd = ["qc-robot", "finetune", f"checkpoint={args.checkpoint}", f"server={lrn}", f"run_dir={run_dir}",
                  f"max_env_steps={n_steps}", "utd=1", f"push_every={push_every}", "threads=1",
                  f"start_updates={args.start_updates}",
                  "replay_capacity=20000", "log_interval=250", f"max_wall_s={args.arm_timeout - 60:.0f}",
                  f"seed={cfg.training.seed}"]
        drive_cmd = ["qc-robot", "drive", "driver=sim", f"env={cfg.env.name}", f"server={drv}", "episodes=10000",
                     f"seed={args.drive_seed}", "send_transitions=true"]
        drive_cmd += (["realtime=false", f"pace_every={cfg.agent.horizon}"] if lockstep
                      else ["realtime=true", f"time_scale={args.time_scale:g}"])
        t0 = time.monotonic()
        server = background(serve_cmd, out / f"serve_{arm}.log")
        time.sleep(3)
        ft = background(ft_cmd, out / f"finetune_{arm}.log")
        time.sleep(3)
        drive = background(drive_cmd, out / f"drive_{arm}.log")
        try:
            ft.wait(args.arm_timeout)
        except subprocess.TimeoutExpired:
            print("finetune did not finish in time: stopping it", flush=True)
            stop(ft, signal.SIGINT, 120)
        wall = time.monotonic() - t0
        stop(drive)
        stop(server)
        ft_log = (out / f"finetune_{arm}.log").read_text()
        m = re.search(r"done: (\d+) online updates, (\d+) env steps, (\d+) episodes \((\d+) successes\).*policy v(\d+)",
                      ft_log)
        if m is None:
            raise RuntimeError(f"finetune did not report done:\n{ft_log[-3000:]}")
        pushes = len(re.findall(r"pushed policy v\d+", ft_log))
        drive_log = (out / f"drive_{arm}.log").read_text()
        robot_held = sum(int(h) for h in re.findall(r"robot held (\d+)", drive_log))
        overruns = sum(int(h) for h in re.findall(r"overruns (\d+)", drive_log))
        robot_steps = sum(int(h) for h in re.findall(r"\(robot (\d+)\)", drive_log))
        k, n, step = evaluate(run_dir / "checkpoint.pt", args.episodes, args.seed, out / f"eval_{arm}.log")
        name = ("stack, lockstep robot paced to the learner" if lockstep
                else f"stack, wall clock {20 * args.time_scale:g} Hz")
        rows.append(dict(arm=name, k=k, n=n, updates=int(m.group(1)), env_steps=int(m.group(2)), wall=wall,
                         pushes=f"{pushes} every {push_every} (served v{m.group(5)}; {m.group(3)} training episodes, "
                                f"{m.group(4)} successes; robot held {robot_held}/{robot_steps} ticks, "
                                f"{overruns} overruns)",
                         cmd=" && ".join(" ".join(c) for c in (serve_cmd, ft_cmd, drive_cmd))))

    print()
    print(f"Checkpoint `{args.checkpoint}` (update {offline_step}), task {cfg.env.name}, N = {n_steps} online env "
          f"steps, UTD 1; eval {args.episodes} episodes, seeds {args.seed}..{args.seed + args.episodes - 1}.")
    print()
    print("| arm | success | rate | 95% Wilson CI | online updates | env steps | wall s | policy pushes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = wilson(r["k"], r["n"])
        print(f"| {r['arm']} | {r['k']}/{r['n']} | {100 * r['k'] / r['n']:.0f}% | [{100 * lo:.0f}%, {100 * hi:.0f}%] "
              f"| {r['updates']} | {r['env_steps']} | {r['wall']:.0f} | {r['pushes']} |")
    print()
    for r in rows:
        print(f"- {r['arm']}: `{r['cmd']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
