"""Updates per second of ``QCAgent.update`` (and acting latency) on this machine.

    python benchmarks/bench_update.py [--threads N] [--configs reference small] [--compile]
                                      [--out docs/benchmarks_update.md]

Synthetic batches (the update's cost does not depend on the data). Each row: warm-up updates,
then ``repeats`` timed runs of ``steps`` updates; updates/s is steps / median run time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from qc_robot.agent.acting import euler_sample
from qc_robot.agent.agent import QCAgent
from qc_robot.config import AgentConfig
from qc_robot.data.batch import ChunkBatch

OBS_DIM, ACT_DIM = 37, 5  # cube-double


@dataclass
class Setting:
    name: str
    hidden: list[int]


SETTINGS = {
    "reference": Setting("reference (4×512)", [512] * 4),
    "small": Setting("small CPU (2×256)", [256] * 2),
}


def synthetic_batch(cfg: AgentConfig, seed: int = 0) -> ChunkBatch:
    g = torch.Generator().manual_seed(seed)
    b, h = cfg.batch_size, cfg.horizon
    return ChunkBatch(
        observations=torch.randn(b, OBS_DIM, generator=g),
        actions=torch.rand(b, h, ACT_DIM, generator=g) * 2 - 1,
        rewards=torch.randn(b, h, generator=g),
        masks=torch.ones(b, h),
        terminals=torch.zeros(b, h),
        valid=torch.ones(b, h),
        next_observations=torch.randn(b, OBS_DIM, generator=g),
    )


def time_updates(agent: QCAgent, batch: ChunkBatch, warmup: int, repeats: int, steps: int) -> float:
    for _ in range(warmup):
        agent.update(batch)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            info = agent.update(batch)
        float(info["total_loss"])  # sync (a no-op on CPU)
        runs.append(time.perf_counter() - t0)
    return steps / statistics.median(runs)


def act_latency_ms(agent: QCAgent, n: int = 20) -> float:
    obs = torch.randn(1, OBS_DIM)
    agent.act(obs)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        agent.act(obs)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


@torch.no_grad()
def bf16_target_error(hidden: list[int], actor_type: str) -> str:
    """Effect of bf16 sampling on the bootstrap value Q̄(s', a') (random-init nets, same noise)."""

    def mk(dtype: str) -> QCAgent:
        cfg = AgentConfig(actor_type=actor_type, hidden_dims=hidden, sample_dtype=dtype)
        return QCAgent(cfg, OBS_DIM, ACT_DIM, seed=0)

    ref, lp = mk("float32"), mk("bfloat16")
    for c in lp._lp:
        c.refresh()
    obs = torch.randn(256, OBS_DIM)
    noise = torch.randn(ref.noise_shape(256))
    if actor_type == "best_of_n":
        q32 = ref.target_critic(obs, ref._target_actions(obs, noise)).mean(0)
        q16 = ref.target_critic(obs, lp._target_actions(obs, noise)).mean(0)
        rel = ((q32 - q16).abs().mean() / q32.abs().mean()).item()
        return f"best-of-N target Q̄(s′,a′): mean |Δ| = {100 * rel:.2f}% of mean |Q̄|"
    z = noise
    d32 = euler_sample(ref.flow, obs, z, ref.cfg.flow_steps)
    d16 = euler_sample(lp._sampling["flow"], obs, z, ref.cfg.flow_steps)
    return f"QC-FQL distillation target: max |Δa| = {(d32 - d16).abs().max().item():.4f}, mean |Δa| = {(d32 - d16).abs().mean().item():.5f} (actions in [−1, 1])"


def machine() -> str:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    flags = "avx512_bf16" if "avx512_bf16" in open("/proc/cpuinfo").read() else "no avx512_bf16"
    return (
        f"{model} ({flags}), nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[os.cpu_count()],
        help="torch thread counts to time (default: all cores)",
    )
    p.add_argument("--configs", nargs="+", default=["reference", "small"], choices=sorted(SETTINGS))
    p.add_argument("--actors", nargs="+", default=["best_of_n", "fql"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument(
        "--compile", action="store_true", help="also time cfg.compile=True (slow to build)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args()
    load0 = os.getloadavg()
    lines = [
        "# QCAgent.update throughput",
        "",
        f"Machine: {machine()}.",
        "",
        f"Agent: obs_dim {OBS_DIM}, act_dim {ACT_DIM}, horizon 5, batch 256, N 32, flow_steps 10, "
        "2 critics; synthetic batches; median of timed runs after warm-up.",
        "",
        "| setting | actor | sampling dtype | compile | threads | updates/s | act latency (B=1, ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for threads, key in ((t, k) for t in args.threads for k in args.configs):
        torch.set_num_threads(threads)
        s = SETTINGS[key]
        for actor in args.actors:
            for dtype in args.dtypes:
                for comp in [False, True] if args.compile else [False]:
                    cfg = AgentConfig(
                        actor_type=actor, hidden_dims=s.hidden, sample_dtype=dtype, compile=comp
                    )
                    agent = QCAgent(cfg, OBS_DIM, ACT_DIM, seed=0)
                    batch = synthetic_batch(cfg)
                    bon = actor == "best_of_n"
                    warmup = (3 if comp else 1) if bon else (5 if comp else 3)
                    steps = (2 if key == "reference" else 5) if bon else 10
                    ups = time_updates(agent, batch, warmup, args.repeats, steps)
                    lat = act_latency_ms(agent)
                    row = f"| {s.name} | {actor} | {dtype} | {'on' if comp else 'off'} | {threads} | {ups:.2f} | {lat:.2f} |"
                    lines.append(row)
                    print(row, flush=True)
    load1 = os.getloadavg()
    notes = ["", "bf16 sampling error (reference networks, random init, same noise):"]
    for actor in args.actors:
        notes.append(f"- {bf16_target_error(SETTINGS['reference'].hidden, actor)}")
    notes += [
        "",
        f"Load average (1 min) before/after: {load0[0]:.2f} / {load1[0]:.2f} "
        "(other processes shared the cores).",
    ]
    print("\n".join(notes))
    lines += notes
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
