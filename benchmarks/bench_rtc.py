"""Executor modes under inference delay on the MuJoCo sim driver, on a simulated clock.

Modes ``open_loop``, ``latency_aware``, ``rtc`` and ``temporal_ensemble`` (drivers/executor.py)
run the same exported flow policy on ``cube-single-task1`` (20 Hz) with an injected inference
delay of 0, 50, 100 and 200 ms. The clock is simulated: the sim driver is lockstep (the world
advances one control period per command, hold or not), and a request made at tick t is answered
at tick ``t + ceil(delay / 50 ms)`` (``qc_robot.drivers.simclock.DelayedPolicySource``; 0 ms: within the
tick). The policy's own compute time does not count: the delay is exactly the injected one, so
the modes are compared on the same, reproducible timeline rather than on this machine's load.

Per mode and delay: success rate, completion time (ticks to success × 50 ms, successful
episodes), seam jerk (mean squared second difference of the commanded actions at the steps where
execution switches chunk, ``qc_robot.drivers.simclock.seam_jerk``), jerk over all steps, and held ticks.
Episodes use seeds 0..E-1 in every cell (paired).

The policy: no trained checkpoint ships with the repository, so ``--train`` makes one here:
scripted demonstrations (OGBench's cube plan oracle, qc_robot.teleop.scripted) on the lockstep
sim, a flow-matching behaviour-cloning actor (2×256, H = 10 chunks, 10 Euler steps) fit to them,
exported with ``qc-robot``'s exporter (best-of-N with N = 1: the critic is untrained, so it ranks
nothing here; RTC's critic ranking is covered by tests/test_rtc.py).

    python benchmarks/bench_rtc.py --train /tmp/rtc_policy.onnx --episodes 50 \
        --out docs/benchmarks_rtc.md --png docs/img/rtc_modes.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from e2e_common import wilson  # benchmarks/ is the script's directory

TASK = "cube-single-task1"
MODES = ("open_loop", "latency_aware", "rtc", "temporal_ensemble")
DELAYS_MS = (0, 50, 100, 150, 200, 300)
PERIOD_MS = 50.0


# -- the policy --------------------------------------------------------------------------------


def collect_demos(episodes: int, noise: float, seed: int) -> list[dict[str, np.ndarray]]:
    """Scripted plan-oracle episodes on the lockstep sim: [{'obs': (T, O), 'actions': (T, A)}]."""
    from qc_robot.drivers.sim import SimConfig, SimDriver
    from qc_robot.teleop.scripted import ScriptedOperator

    driver = SimDriver(SimConfig(env=TASK, realtime=False, seed=seed))
    driver.connect()
    op = ScriptedOperator(lambda: driver.env, oracle="plan", noise=noise, seed=seed)
    demos = []
    for ep in range(episodes):
        obs = driver.reset(seed + 1000 + ep)["state"]
        op.episode_started({"state": obs})
        o, a = [], []
        for _ in range(driver.spec.max_episode_steps):
            act = op.read().action
            assert act is not None
            o.append(obs.astype(np.float32))
            a.append(act)
            driver.send_action(act)
            obs = driver.get_observation()["state"]
            info = driver.step_info()
            if info.terminated or info.truncated:
                break
        op.episode_ended()
        if driver.step_info().success:
            demos.append({"obs": np.stack(o), "actions": np.stack(a)})
    driver.close()
    return demos


def train_policy(out: Path, demos: list[dict[str, np.ndarray]], horizon: int, steps: int, seed: int) -> Path:
    """Flow-matching BC on the demos' H-step chunks, exported (with RTC inputs) to ``out``."""
    import torch

    from qc_robot.agent.acting import ActingPolicy
    from qc_robot.agent.networks import ChunkCritic, FlowActor
    from qc_robot.export.onnx_export import build_metadata, export_policy
    from qc_robot.policies.base import ObsField

    torch.manual_seed(seed)
    obs, chunks = [], []
    for d in demos:
        o, a = d["obs"], d["actions"]
        pad = np.concatenate([a, np.repeat(a[-1:] * 0, horizon, 0)])  # after success: hold (zeros)
        for t in range(len(o)):
            obs.append(o[t])
            chunks.append(pad[t : t + horizon].reshape(-1))
    x_obs = torch.tensor(np.stack(obs))
    x_act = torch.tensor(np.stack(chunks), dtype=torch.float32)  # (N, H·A)
    obs_dim, d = x_obs.shape[1], x_act.shape[1]
    flow = FlowActor(obs_dim, d, [256, 256])
    critic = ChunkCritic(obs_dim, d, [64])
    for net in (flow, critic):
        net.normalizer.set_stats(x_obs.mean(0), x_obs.std(0))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-4)
    for i in range(steps):
        idx = torch.randint(len(x_obs), (256,))
        x1, s = x_act[idx], x_obs[idx]
        x0 = torch.randn_like(x1)
        t = torch.rand(len(idx), 1)
        loss = ((flow(s, (1 - t) * x0 + t * x1, t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 1000 == 0 or i == steps - 1:
            print(f"  bc step {i}: loss {loss.item():.4f}", flush=True)
    acting = ActingPolicy("best_of_n", flow, critic, None, horizon, d // horizon, 10, "mean").eval()
    meta = build_metadata(acting, [ObsField("state", (obs_dim,))], -np.ones(d // horizon), np.ones(d // horizon),
                          20.0, num_samples=1, config_hash="bench-rtc-bc")
    return export_policy(acting, meta, out)


# -- one cell: a mode at a delay -----------------------------------------------------------------


def run_cell(args: tuple[Any, ...]) -> dict[str, Any]:
    """Run ``episodes`` episodes of ``mode`` with ``delay_ms`` (and ``max_inflight``, 1: no
    pipelining; the policy's noise seed, None: OS entropy; and whether the hold is all zeros, as
    before the sim kept the gripper's command); returns the per-episode records."""
    policy_path, mode, delay_ms, episodes, threshold_pct = args[:5]
    inflight = args[5] if len(args) > 5 else 1
    policy_seed = args[6] if len(args) > 6 else None
    zero_hold = bool(args[7]) if len(args) > 7 else False
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from qc_robot.drivers.executor import ChunkExecutor
    from qc_robot.drivers.safety import SafeDriver
    from qc_robot.drivers.sim import SimConfig, SimDriver
    from qc_robot.drivers.simclock import DelayedPolicySource, seam_jerk
    from qc_robot.policies.onnx_policy import OnnxPolicy

    policy = OnnxPolicy(policy_path, threads=1, warmup=2, seed=policy_seed)
    driver = SafeDriver(SimDriver(SimConfig(env=TASK, realtime=False, hold_keeps=[] if zero_hold else None)))
    driver.connect()
    delay_steps = math.ceil(delay_ms / PERIOD_MS - 1e-9)
    clock = [0]
    source = DelayedPolicySource(policy, delay_steps, lambda: clock[0])
    # tick_wait: a reply due within this tick (delay 0) serves it, as the realtime runner's wait does
    ex = ChunkExecutor(source, policy.meta.chunk_len, mode, threshold=threshold_pct / 100.0, tick_wait_s=2e-4,
                       max_inflight=inflight)
    records = []
    t0 = time.perf_counter()
    for ep in range(episodes):
        obs = driver.reset(ep)
        ex.reset()
        held0 = driver.stats.held
        commanded, seqs, success_step = [], [], -1
        for step in range(driver.spec.max_episode_steps):
            clock[0] = step
            if step > 0:
                obs = driver.get_observation()
            action = ex.act(obs, step, ep)
            commanded.append(driver.act(action))
            seqs.append(ex.last_seq if action is not None else -1)
            info = driver.step_info()
            if info.success and success_step < 0:
                success_step = step + 1
            if info.terminated or info.truncated:
                break
        jerk, seams = seam_jerk(commanded, seqs)
        a = np.asarray(commanded, np.float64)
        d2 = np.sum((a[2:] - 2 * a[1:-1] + a[:-2]) ** 2, axis=1) if len(a) > 2 else np.zeros(1)
        records.append({"success": success_step > 0, "ticks": len(commanded), "success_tick": success_step,
                        "seam_jerk": jerk, "seams": seams, "jerk_all": float(d2.mean()),
                        "held": driver.stats.held - held0})
    driver.close()
    return {"mode": mode, "delay_ms": delay_ms, "inflight": inflight, "records": records,
            "wall_s": time.perf_counter() - t0}


# -- the cost of guidance ------------------------------------------------------------------------


def latency(calls: int, out: Path | None) -> str:
    """OnnxPolicy.predict of one file, plain vs continued (d = 2, L = 3), at the reference config
    (random weights: 4×512, N = 32, 10 flow steps, H = 5, A = 5, obs 37), one thread, interleaved."""
    import tempfile

    import torch

    from qc_robot.agent.acting import ActingPolicy
    from qc_robot.agent.networks import ChunkCritic, FlowActor
    from qc_robot.export.onnx_export import build_metadata, export_policy
    from qc_robot.policies.base import ChunkGuide, ObsField
    from qc_robot.policies.onnx_policy import OnnxPolicy

    torch.manual_seed(0)
    torch.set_num_threads(1)
    h, a, o, hidden = 5, 5, 37, [512] * 4
    acting = ActingPolicy("best_of_n", FlowActor(o, h * a, hidden), ChunkCritic(o, h * a, hidden), None, h, a,
                          10, "mean").eval()
    meta = build_metadata(acting, [ObsField("state", (o,))], -np.ones(a), np.ones(a), 20.0, num_samples=32)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_policy(acting, meta, Path(tmp) / "ref.onnx")
        export_s = time.perf_counter() - t0
        policy = OnnxPolicy(path, threads=1, warmup=20)
        obs = {"state": np.zeros(o, np.float32)}
        prev = policy.predict(obs).actions
        guide = ChunkGuide(np.concatenate([prev[2:], np.zeros((2, a), np.float32)]), delay=2, overlap=3)
        times: dict[str, list[float]] = {"plain": [], "rtc": []}
        for _ in range(calls // 10):
            for name in times:
                for _ in range(10):
                    t1 = time.perf_counter()
                    policy.predict(obs, guide if name == "rtc" else None)
                    times[name].append(time.perf_counter() - t1)
    lines = ["| call | p50 (ms) | p99 (ms) |", "|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| `OnnxPolicy.predict`, {'with a guide (d = 2, L = 3)' if name == 'rtc' else 'plain'} | "
                     f"{1e3 * np.median(ts):.2f} | {1e3 * np.percentile(ts, 99):.2f} |")
    text = (f"Reference config (4×512, N = 32, 10 flow steps, H = 5, A = 5, obs 37), random weights, one "
            f"onnxruntime thread, {calls} calls each, interleaved; export (two traces + verification) took "
            f"{export_s:.0f} s.\n\n" + "\n".join(lines) + "\n")
    if out is not None:
        out.write_text(text)
    return text


# -- report --------------------------------------------------------------------------------------


def summarize(cell: dict[str, Any]) -> dict[str, Any]:
    r = cell["records"]
    ok = [x for x in r if x["success"]]
    seam = [x["seam_jerk"] for x in r if x["seams"] > 0]
    return {
        "mode": cell["mode"], "delay_ms": cell["delay_ms"], "inflight": cell.get("inflight", 1), "episodes": len(r),
        "successes": len(ok), "success": len(ok) / max(1, len(r)),
        "completion_s": float(np.median([x["success_tick"] for x in ok])) * PERIOD_MS / 1e3 if ok else float("nan"),
        "seam_jerk": float(np.mean(seam)) if seam else float("nan"),
        "seam_jerk_p50": float(np.median(seam)) if seam else float("nan"),
        "jerk_all": float(np.mean([x["jerk_all"] for x in r])),
        "held_per_ep": float(np.mean([x["held"] for x in r])),
        "held_frac": float(sum(x["held"] for x in r) / max(1, sum(x["ticks"] for x in r))),
    }


def write_table(rows: list[dict[str, Any]], out: Path | None, header: str) -> str:
    lines = [header, "",
             "| delay | mode | in flight ≤ | episodes | success [95% Wilson CI] | completion p50 (s) | seam jerk mean / p50 "
             "| jerk, all steps | held ticks / episode (share) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r.get("successes", round(r["success"] * r["episodes"]))
        lo, hi = wilson(k, r["episodes"])
        lines.append(
            f"| {r['delay_ms']} ms | `{r['mode']}` | {r.get('inflight', 1)} | {r['episodes']} | "
            f"{k}/{r['episodes']} [{100 * lo:.0f}, {100 * hi:.0f}] | "
            f"{r['completion_s']:.2f} | {r['seam_jerk']:.4f} / {r['seam_jerk_p50']:.4f} | {r['jerk_all']:.4f} | "
            f"{r['held_per_ep']:.1f} ({100 * r['held_frac']:.0f}%) |")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    keys = [("success", "success rate"), ("completion_s", "completion time p50 (s)"),
            ("seam_jerk", "seam jerk (mean Δ²a², log)"), ("held_per_ep", "held ticks / episode")]
    for ax, (key, label) in zip(axes, keys, strict=True):
        for mode in MODES:
            for inflight in sorted({r.get("inflight", 1) for r in rows if r["mode"] == mode}):
                pts = sorted((r["delay_ms"], r[key]) for r in rows
                             if r["mode"] == mode and r.get("inflight", 1) == inflight)
                name = mode if inflight == 1 else f"{mode}, pipelined"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                        linestyle="-" if inflight == 1 else "--")
        ax.set_xlabel("injected inference delay (ms) at 20 Hz")
        ax.set_title(label)
        if key == "seam_jerk":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="", help="an exported policy for cube-single (obs key 'state')")
    ap.add_argument("--train", default="", help="make the BC policy at this path first (see the docstring)")
    ap.add_argument("--demos", type=int, default=40)
    ap.add_argument("--demo-noise", type=float, default=0.1)
    ap.add_argument("--bc-steps", type=int, default=4000)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--delays", default=",".join(map(str, DELAYS_MS)))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threshold", type=int, default=50, help="request threshold, percent of H")
    ap.add_argument("--policy-seed", type=int, default=None,
                    help="seed the policy's sampling noise, the same in every cell (cells whose requests match "
                         "then give the same episodes); default: OS entropy, independent draws per cell")
    ap.add_argument("--zero-hold", action="store_true",
                    help="the sim's old all-zeros hold (its gripper stops squeezing on a held tick)")
    ap.add_argument("--inflight", default="1", help="max requests in flight to compare, e.g. 1,4 (1: no pipelining; "
                    "open_loop always 1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="", help="write the per-cell summaries here")
    ap.add_argument("--out", default="")
    ap.add_argument("--png", default="")
    ap.add_argument("--latency", type=int, default=0, help="only time plain vs guided calls (this many each)")
    args = ap.parse_args()
    if args.latency:
        print(latency(args.latency, Path(args.out) if args.out else None))
        return
    policy = args.policy
    if args.train:
        import torch

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        demos = collect_demos(args.demos, args.demo_noise, seed=7)
        print(f"{len(demos)}/{args.demos} successful demos, {sum(len(d['obs']) for d in demos)} steps "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        policy = str(train_policy(Path(args.train), demos, args.horizon, args.bc_steps, seed=0))
        print(f"policy exported to {policy} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not policy:
        ap.error("give --policy or --train")
    cells = [(policy, m, int(d), args.episodes, args.threshold, int(k), args.policy_seed, args.zero_hold)
             for d in args.delays.split(",") for m in args.modes.split(",") for k in args.inflight.split(",")
             if m != "open_loop" or k == "1"]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_cell, cells))
    rows = [summarize(c) for c in results]
    wall = time.perf_counter() - t0
    for c in results:
        print(f"  {c['delay_ms']:>3} ms {c['mode']:<18} ≤{c['inflight']} in flight: {len(c['records'])} episodes "
              f"in {c['wall_s']:.0f} s", flush=True)
    header = (f"Task {TASK}, 20 Hz, simulated clock (delay counted in control periods), "
              f"{args.episodes} episodes per cell (seeds 0..{args.episodes - 1}), request threshold "
              f"{args.threshold}% of H; policy {Path(policy).name}; {wall:.0f} s wall on {args.workers} workers.")
    print(write_table(rows, Path(args.out) if args.out else None, header))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.png:
        plot(rows, Path(args.png))


if __name__ == "__main__":
    main()
