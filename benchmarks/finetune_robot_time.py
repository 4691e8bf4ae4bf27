"""Success against robot wall-clock time: from noisy demonstrations to a fine-tuned policy on the
blind sim, with a learned success detector giving the reward (issue 24's headline benchmark).

Stages (each kept in --out-dir and reused when its output exists):

1. ``demos.hdf5``: --demos scripted teleop demonstrations (OGBench's plan oracle with action noise
   --noise), each labelled by the sim's outcome, as an operator's verdict would label it.
2. ``labelled_lo.hdf5``, ``labelled_hi.hdf5``: --labelled more scripted episodes at noise --noise
   and 4x --noise (a mix of successes and failures), then --judge-rounds rounds of episodes of the
   offline policy (stage 3) on the blind sim, logged by the server (``judged<r>/``): in round 0 the
   scripted operator judges each; in round r > 0 the detector of round r-1 ends them and the
   operator overrules its false fires. ``reward<r>.onnx`` (``qc-robot reward``) learns from every
   file so far; the last is ``reward.onnx``. The sim's episodes end at their first success frame,
   so only that frame is a positive (--positive-frames 1). Arms a and b run it at the lowest
   threshold of its held-out sweep with a per-episode false-positive rate <= --fp-target.
3. ``offline/checkpoint.pt``: ``qc-robot train`` on the demos alone (sparse rewards: -1 a step,
   0 and the end at success, as verdicts give them),
   exported to ``model.onnx``.
4. Arms, each ``qc-robot serve`` + ``qc-robot finetune`` + ``qc-robot drive driver=sim
   realtime=true`` (the 20 Hz wall clock) for --minutes of robot time, with the learner's
   checkpoint copied every --eval-every minutes (it saves every --save-every updates):
   - ``a``: ``blind=true reward_model=reward.onnx operator=scripted operator_args.verdicts=false``:
     the detector gives the reward, the scripted operator takes over when the policy stalls and
     reviews each detector fire against the hidden truth;
   - ``b``: ``blind=true reward_model=reward.onnx``, no operator: the detector alone;
   - ``c``: the sim's true sparse reward, no operator (the upper bound);
   - ``a_fp``: arm a with the detector's threshold at --fp-threshold (pick it from the held-out
     sweep the detector prints to give about 10% false positives per episode);
   - ``a_reload``: arm a with ``reward_reload=true``: every --eval-every minutes the detector is
     retrained (niced) on the pipeline's files plus the episodes the arm's server logged so far
     (``a_reload/served``, the operator's overrules included) and exported over the file ``drive``
     watches (``a_reload/reward_live.onnx``); ``drive`` swaps it in at its next episode;
   - ``d`` is the offline policy: every arm's minute-0 point.
5. Each copied checkpoint is evaluated with ``qc-robot eval`` on --eval-episodes fresh episodes
   (the same seeds for every point), after the arms ran (evaluation never competes with a live
   arm for the CPU). Prints a markdown table (success with Wilson CIs at each minute, the env steps
   and updates behind it, UTD held, learner waits, interventions, detector overrules) and writes a
   PNG of success and intervention rate against robot minutes.

    OMP_NUM_THREADS=1 python benchmarks/finetune_robot_time.py --out-dir runs/robot_time \\
        --minutes 30 --eval-every 5 --eval-episodes 50 --arms a,b,c,a_fp --fp-threshold 0.2

Robot time is wall-clock time from ``drive``'s start: it includes resets, reviews and the waits
for a slower learner, as on a real arm. Every process runs with one thread.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e_common import background, run, stop, wilson  # noqa: E402 (after the path set-up)

ARMS = {
    "a": "detector reward + scripted interventions",
    "b": "detector reward, no operator",
    "c": "the sim's true reward (upper bound)",
    "a_fp": "arm a, detector threshold lowered",
    "a_reload": "arm a, detector retrained as it runs",
}


@dataclass
class Snapshot:
    minute: float
    path: Path
    updates: int = 0
    env_steps: int = 0
    episodes: int = 0
    k: int = 0
    n: int = 0


@dataclass
class ArmResult:
    arm: str
    snaps: list[Snapshot] = field(default_factory=list)
    drive_log: str = ""
    wall_s: float = 0.0
    cmd: str = ""


def teleop(out: Path, task: str, episodes: int, noise: float, seed: int, log: Path) -> None:
    if out.exists():
        return
    run(["qc-robot", "teleop", "driver=sim", f"env={task}", "device=scripted", "oracle=plan",
         f"oracle_noise={noise:g}", "realtime=false", f"episodes={episodes}", f"seed={seed}", f"out={out}",
         "status=false"], 3600, log)


def labels(path: Path) -> tuple[int, int]:
    import h5py

    with h5py.File(path, "r") as f:
        got = [str(f["data"][k].attrs.get("label", "")) for k in f["data"]]
    return sum(g == "success" for g in got), len(got)


def evaluate(ckpt: Path, episodes: int, seed: int, log: Path) -> tuple[int, int]:
    out, _ = run(["qc-robot", "eval", f"checkpoint={ckpt}", f"episodes={episodes}", f"seed={seed}",
                  "progress=false"], 3600, log)
    m = re.search(r"success ([\d.]+) over (\d+) episodes", out)
    if m is None:
        raise RuntimeError(f"eval printed no success rate:\n{out[-2000:]}")
    n = int(m.group(2))
    return round(float(m.group(1)) * n), n


def judge(args: argparse.Namespace, out: Path, onnx: Path, rnd: int, detector: Path | None) -> list[Path]:
    """Round ``rnd`` of judged episodes of the offline policy on the blind sim, logged by the
    server. Round 0: the scripted operator judges each (the sim's hidden outcome), as an operator
    judges the first fine-tuning episodes by hand. Later rounds: ``detector`` ends them and the
    operator reviews each fire against the truth, overruling the false ones: the corrections
    become labelled data (the near misses a detector mistakes for successes). The operator takes
    over when the policy stalls, in every round."""
    d = out / f"judged{rnd}"
    if not list(d.glob("*.hdf5")):
        shutil.rmtree(d, ignore_errors=True)
        port = args.port - 2
        server = background(["qc-robot", "serve", "--policy", str(onnx), f"bind=tcp://127.0.0.1:{port}",
                             f"log_dir={d}", "threads=1", "providers=cpu"], out / f"serve_judged{rnd}.log")
        time.sleep(3)
        cmd = ["qc-robot", "drive", "driver=sim", f"env={args.task}", f"server=tcp://127.0.0.1:{port}",
               f"episodes={args.judged * (rnd + 1)}", f"seed={50_000 + 10_000 * rnd}", "realtime=false", "blind=true",
               "operator=scripted", f"operator_args.noise={args.noise:g}", "env.sparse_reward=true"]
        if detector is not None:
            cmd += [f"reward_model={detector}", "operator_args.verdicts=false", "review_s=0.2",
                    f"operator_args.missed_after={args.missed_after}"]
        try:
            run(cmd, 3600, out / f"drive_judged{rnd}.log")
        finally:
            stop(server)
    return sorted(d.glob("*.hdf5"))


def train_reward(args: argparse.Namespace, files: list[Path], out_file: Path) -> None:
    if not out_file.exists():
        run(["qc-robot", "reward", *map(str, files), f"out={out_file}", f"positive_frames={args.positive_frames}",
             f"gap_frames={args.gap_frames}", "progress=false"], 3600, out_file.with_suffix(".log"))


def live_fires(log: Path) -> str:
    """The detector's record in a drive log: fires and the operator's overrules."""
    m = re.search(r"reward model: fired in (\d+)/(\d+) episodes; overruled (\d+) of (\d+) operator verdicts "
                  r"\((\d+) false positives, (\d+) missed", log.read_text() if log.exists() else "")
    return (f"fired in {m.group(1)}/{m.group(2)} episodes, {m.group(5)} of them false (overruled), "
            f"{m.group(6)} successes missed" if m else "n/a")


def cached_eval(record: Path, ckpt: Path, args: argparse.Namespace) -> tuple[int, int]:
    """``evaluate``, kept in ``record`` for the same episodes and seed (a rerun adds arms, not work)."""
    key = {"episodes": args.eval_episodes, "seed": args.eval_seed}
    if record.exists() and (got := json.loads(record.read_text()))["key"] == key:
        return int(got["k"]), int(got["n"])
    k, n = evaluate(ckpt, args.eval_episodes, args.eval_seed, record.with_suffix(".log"))
    record.write_text(json.dumps({"key": key, "k": k, "n": n}))
    return k, n


def ckpt_counts(path: Path, offline_step: int) -> tuple[int, int, int]:
    """(online updates, env steps, finished episodes) of a finetune checkpoint."""
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=False)
    ft = payload["extra"].get("finetune", {})
    return int(payload["step"]) - offline_step, int(payload["env_steps"]), int(ft.get("episodes", 0))


def run_arm(arm: str, args: argparse.Namespace, out: Path, onnx: Path, ckpt: Path, offline_step: int,
            port: int, files: list[Path]) -> ArmResult:
    d = out / arm
    done = d / "arm.json"
    if done.exists():  # ran before with these settings: reuse its snapshots (evaluated afresh)
        saved = json.loads(done.read_text())
        if saved["minutes"] == args.minutes and saved["eval_every"] == args.eval_every:
            res = ArmResult(arm, [Snapshot(**s, path=d / f"ckpt_{s['minute']:g}min.pt") for s in saved["snaps"]],
                            (d / "drive.log").read_text(), saved["wall_s"], saved["cmd"])
            print(f"arm {arm}: reusing the run in {d}", flush=True)
            return res
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    drv, lrn = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    serve_cmd = ["qc-robot", "serve", "--policy", str(onnx), f"bind={drv}", f"learner_bind={lrn}",
                 f"journal_dir={d / 'journal'}", f"log_dir={d / 'served'}", "threads=1", "providers=cpu"]
    ft_cmd = ["qc-robot", "finetune", f"checkpoint={ckpt}", f"server={lrn}", f"run_dir={d / 'ft'}",
              f"utd={args.utd}", f"push_every={args.push_every}", f"save_every={args.save_every}", "threads=1",
              "replay_capacity=100000", "log_interval=250", f"seed={args.seed}"]
    drive_cmd = ["qc-robot", "drive", "driver=sim", f"env={args.task}", f"server={drv}", "episodes=100000",
                 f"seed={args.drive_seed}", "env.sparse_reward=true", "realtime=true", f"outbox_dir={d / 'outbox'}",
                 f"learner_wait={args.learner_wait}"]
    live = d / "reward_live.onnx"  # a_reload: the file drive watches, retrained as the arm runs
    if arm == "a_reload":
        shutil.copy(out / "reward.onnx", live)
        drive_cmd += ["blind=true", f"reward_model={live}", "reward_reload=true"]
    elif arm in ("a", "b", "a_fp"):
        drive_cmd += ["blind=true", f"reward_model={out / 'reward.onnx'}"]
    if arm in ("a", "a_fp", "a_reload"):
        drive_cmd += ["operator=scripted", "operator_args.verdicts=false", f"operator_args.noise={args.noise:g}",
                      f"operator_args.missed_after={args.missed_after}"]
    if arm == "a_fp":
        drive_cmd += [f"reward_threshold={args.fp_threshold:g}"]
    elif arm in ("a", "b", "a_reload") and args.detector_threshold > 0:
        drive_cmd += [f"reward_threshold={args.detector_threshold:g}"]
    server = background(serve_cmd, d / "serve.log")
    time.sleep(3)
    ft = background(ft_cmd, d / "finetune.log")
    time.sleep(3)
    t0 = time.monotonic()
    drive = background(drive_cmd, d / "drive.log")
    res = ArmResult(arm, cmd=" && ".join(" ".join(c) for c in (serve_cmd, ft_cmd, drive_cmd)))
    marks = [args.eval_every * i for i in range(1, int(args.minutes / args.eval_every + 1e-9) + 1)]
    for minute in marks:
        while time.monotonic() - t0 < 60 * minute:
            if drive.poll() is not None or ft.poll() is not None:
                raise RuntimeError(f"arm {arm}: drive or finetune exited early (logs in {d})")
            time.sleep(1.0)
        snap = d / f"ckpt_{minute:g}min.pt"
        src = d / "ft" / "checkpoint.pt"
        if src.exists():  # saved atomically (rename), so a copy is never torn
            shutil.copy(src, snap)
            res.snaps.append(Snapshot(minute, snap))
        print(f"  arm {arm}: {minute:g} robot minutes", flush=True)
        # complete versions: the logger commits by os.replace
        served = sorted((d / "served").glob("*.hdf5")) if arm == "a_reload" else []
        if served and minute < args.minutes:
            try:
                run(["nice", "-n", "10", "qc-robot", "reward", *map(str, files + served), f"out={live}",
                     f"positive_frames={args.positive_frames}", f"gap_frames={args.gap_frames}", "progress=false"],
                    3600, d / f"reward_live_{minute:g}min.log")
                shutil.copy(live, d / f"reward_live_{minute:g}min.onnx")
            except RuntimeError as e:  # the robot keeps its detector; the arm goes on
                print(f"  arm {arm}: retraining the detector failed: {str(e).splitlines()[0]}", flush=True)
    res.wall_s = time.monotonic() - t0
    stop(drive)
    # drive prints its closing summary on SIGINT; two 30-minute arms left none (docs/results.md §6)
    print(f"  arm {arm}: drive exited with code {drive.returncode}", flush=True)
    stop(ft, signal.SIGINT, 300)
    stop(server)
    res.drive_log = (d / "drive.log").read_text()
    for s in res.snaps:
        s.updates, s.env_steps, s.episodes = ckpt_counts(s.path, offline_step)
    done.write_text(json.dumps({
        "minutes": args.minutes, "eval_every": args.eval_every, "wall_s": res.wall_s, "cmd": res.cmd,
        "drive_exit": drive.returncode,
        "snaps": [{"minute": s.minute, "updates": s.updates, "env_steps": s.env_steps, "episodes": s.episodes}
                  for s in res.snaps]}))
    return res


def intervention_rates(ep_csv: Path, snaps: list[Snapshot]) -> list[float]:
    """Intervention share of the steps of the episodes that ended in each snapshot's interval."""
    if not ep_csv.exists():
        return [float("nan")] * len(snaps)
    with ep_csv.open() as f:
        rows = [(int(r["env_steps"]), int(r["length"]), int(r["interventions"])) for r in csv.DictReader(f)]
    out, lo = [], 0
    for s in snaps:
        sel = [r for r in rows if lo < r[0] <= s.env_steps]
        steps = sum(r[1] for r in sel)
        out.append(sum(r[2] for r in sel) / steps if steps else float("nan"))
        lo = s.env_steps
    return out


def plot(results: list[ArmResult], offline: tuple[int, int], rates: dict[str, list[float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for i, r in enumerate(results):
        color = f"C{i}"  # the same colour for an arm in both panels
        xs = [0.0] + [s.minute for s in r.snaps]
        ks = [offline] + [(s.k, s.n) for s in r.snaps]
        ys = [k / n for k, n in ks]
        cis = [wilson(k, n) for k, n in ks]
        ax.errorbar(xs, ys, yerr=[[y - c[0] for y, c in zip(ys, cis, strict=True)],
                                  [c[1] - y for y, c in zip(ys, cis, strict=True)]],
                    marker="o", capsize=3, color=color, label=f"({r.arm}) {ARMS[r.arm]}")
        if r.arm in rates:
            bx.plot([s.minute for s in r.snaps], rates[r.arm], marker="s", color=color, label=f"({r.arm})")
    ax.axhline(offline[0] / offline[1], color="gray", ls="--", label="(d) offline policy")
    ax.set_ylabel("success (95% Wilson CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.set_ylabel("intervention rate")
    bx.set_ylim(bottom=0.0)
    bx.set_xlabel("robot wall-clock minutes")
    bx.grid(alpha=0.3)
    if rates:
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs/robot_time")
    ap.add_argument("--task", default="cube-single-task1")
    ap.add_argument("--demos", type=int, default=20)
    ap.add_argument("--labelled", type=int, default=60, help="extra labelled episodes for the detector")
    ap.add_argument("--noise", type=float, default=0.3, help="the scripted demonstrator's action noise")
    ap.add_argument("--offline-steps", type=int, default=3000)
    ap.add_argument("--agent", default="qc_fql")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--eval-every", type=float, default=5)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--eval-seed", type=int, default=5000)
    ap.add_argument("--arms", default="a,b,c")
    ap.add_argument("--fp-threshold", type=float, default=0.2)
    ap.add_argument("--judged", type=int, default=40,
                    help="judged episodes of the offline policy in the detector's first round (r+1 times as many in round r)")
    ap.add_argument("--judge-rounds", type=int, default=3, help="rounds of judging and retraining the detector")
    ap.add_argument("--positive-frames", type=int, default=1,
                    help="the sim's episodes end at their first success frame: only it shows a success")
    ap.add_argument("--gap-frames", type=int, default=8)
    ap.add_argument("--fp-target", type=float, default=0.0,
                    help="arms a, b: the lowest detector threshold whose held-out per-episode false-positive rate "
                         "is at most this (-1: the threshold stored in the detector)")
    ap.add_argument("--missed-after", type=int, default=0,
                    help="the scripted operator presses success on a success the detector missed for this many "
                         "ticks (0: never, the runs in docs/results.md)")
    ap.add_argument("--utd", type=int, default=1)
    ap.add_argument("--push-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--learner-wait", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drive-seed", type=int, default=100)
    ap.add_argument("--port", type=int, default=5591)
    ap.add_argument("--png", default="docs/img/finetune_robot_time.png")
    args = ap.parse_args()
    args.detector_threshold = -1.0
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}: pick from {list(ARMS)}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    demos, lo_noise, hi_noise = out / "demos.hdf5", out / "labelled_lo.hdf5", out / "labelled_hi.hdf5"
    teleop(demos, args.task, args.demos, args.noise, 0, out / "teleop_demos.log")
    teleop(lo_noise, args.task, args.labelled // 2, args.noise, 10_000, out / "teleop_lo.log")
    teleop(hi_noise, args.task, args.labelled - args.labelled // 2, 4 * args.noise, 20_000, out / "teleop_hi.log")
    ckpt = out / "offline" / "checkpoint.pt"
    if not ckpt.exists():
        run(["qc-robot", "train", f"agent={args.agent}", "experiment=cpu_small", f"env={args.task}",
             f"data.path={demos}", "env.sparse_reward=true", f"training.offline_steps={args.offline_steps}", "training.online_steps=0",
             "training.eval_episodes=0", "training.threads=1", "training.progress=false",
             f"training.seed={args.seed}", f"training.run_dir={out / 'offline'}"], 7200, out / "train.log")
    onnx = out / "model.onnx"
    if not onnx.exists():
        run(["qc-robot", "export", f"checkpoint={ckpt}", f"out={onnx}"], 600, out / "export.log")
    offline_step = ckpt_counts(ckpt, 0)[0]

    files = [demos, lo_noise, hi_noise]
    detector: Path | None = None
    for rnd in range(args.judge_rounds):  # judge, retrain on the corrections, judge again
        files += judge(args, out, onnx, rnd, detector)
        detector = out / f"reward{rnd}.onnx"
        train_reward(args, files, detector)
    reward = out / "reward.onnx"
    if detector is None:
        train_reward(args, files, reward)
    elif not reward.exists():
        shutil.copy(detector, reward)
        shutil.copy(detector.with_suffix(".metrics.json"), reward.with_suffix(".metrics.json"))
    det = json.loads(reward.with_suffix(".metrics.json").read_text())
    if args.fp_target >= 0:  # the lowest threshold whose held-out per-episode FPR meets the target
        ok = [r["threshold"] for r in det["valid"]["episode_sweep"] if r["fpr"] is not None
              and r["fpr"] <= args.fp_target]
        args.detector_threshold = min(ok) if ok else max(r["threshold"] for r in det["valid"]["episode_sweep"])

    results = [run_arm(a, args, out, onnx, ckpt, offline_step, args.port + 2 * i, files) for i, a in enumerate(arms)]
    offline = cached_eval(out / "eval_offline.json", ckpt, args)
    for r in results:
        for s in r.snaps:
            s.k, s.n = cached_eval(out / r.arm / f"eval_{s.minute:g}.json", s.path, args)
    rates = {r.arm: intervention_rates(out / r.arm / "ft" / "episodes.csv", r.snaps) for r in results
             if r.arm in ("a", "a_fp", "a_reload")}
    plot(results, offline, rates, Path(args.png))

    n_demo_ok, n_demo = labels(demos)
    ep = det["valid"]["episode"]
    print()
    print(f"Task {args.task}; {n_demo} scripted demonstrations at noise {args.noise:g} ({n_demo_ok} successes); "
          f"offline {args.agent}, {offline_step} updates; evaluation {args.eval_episodes} episodes per point, "
          f"seeds {args.eval_seed}..{args.eval_seed + args.eval_episodes - 1}.")
    print(f"Success detector: {det['split']['valid_episodes']} held-out episodes "
          f"({det['split']['valid_successes']} successes): per-episode recall {ep.get('recall')}, "
          f"false-positive rate {ep.get('fpr')} at threshold {det.get('threshold', 'stored')}; arms a, b run it at "
          f"{args.detector_threshold if args.detector_threshold > 0 else det.get('threshold')}; sweep "
          + ", ".join(f"{r['threshold']:g}: fpr {r['fpr']}" for r in det["valid"]["episode_sweep"]))
    for rnd in range(1, args.judge_rounds):
        print(f"Detector round {rnd - 1} on {args.judged * (rnd + 1)} fresh judged episodes: "
              + live_fires(out / f"drive_judged{rnd}.log"))
    print()
    lo, hi = wilson(*offline)
    print("| arm | robot min | success | 95% Wilson CI | env steps | online updates | UTD held | episodes |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| (d) offline policy | 0 | {offline[0]}/{offline[1]} | [{100 * lo:.0f}%, {100 * hi:.0f}%] | 0 | 0 | — | — |")
    for r in results:
        for s in r.snaps:
            lo, hi = wilson(s.k, s.n)
            utd = f"{s.updates / s.env_steps:.2f}" if s.env_steps else "—"
            print(f"| ({r.arm}) {ARMS[r.arm]} | {s.minute:g} | {s.k}/{s.n} | [{100 * lo:.0f}%, {100 * hi:.0f}%] | "
                  f"{s.env_steps} | {s.updates} | {utd} | {s.episodes} |")
    print()
    for r in results:
        lines = [ln for ln in r.drive_log.splitlines()
                 if ln.startswith(("waited for the learner", "reward model:", "scripted", "success "))
                 or "intervention rate" in ln]
        print(f"- ({r.arm}) drive: " + " / ".join(lines))
        if r.arm in rates:
            print("  intervention rate per interval: " + ", ".join(f"{x:.3f}" for x in rates[r.arm]))
        print(f"  `{r.cmd}`")
    print(f"\nplot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
