"""Updates per second of ``QCAgent.update`` (and acting latency) on this machine.

    python benchmarks/bench_update.py [--threads N] [--configs reference small] [--compile]
                                      [--device cpu|cuda] [--out docs/benchmarks_update.md]

Synthetic batches (the update's cost does not depend on the data). Each row: warm-up updates,
then ``repeats`` timed runs of ``steps`` updates; updates/s is steps / median run time, with the
slowest run beside it. The best-of-N candidates are always ranked by the fp32 critic. Every
setting is timed with the module path (``fast_sampling=False``, the baseline: how updates ran
before the fused sampler) and the fused sampler, in the same run, interleaved.
Also reports how often bf16 Euler passes change the best-of-N choice (trained-like networks,
|Q| ≈ 100–200; ``qc_robot.agent.precision_check``). ``--device cuda`` times the CUDA path
(add ``--compile`` for torch.compile there).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from qc_robot.agent.agent import QCAgent
from qc_robot.agent.fast_sampling import FastFlow, fused_linear_available
from qc_robot.agent.precision_check import choice_agreement, trained_like_flow
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


def synthetic_batch(cfg: AgentConfig, seed: int = 0, device: str = "cpu") -> ChunkBatch:
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
    ).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_updates(agent: QCAgent, batch: ChunkBatch, steps: int, device: str) -> float:
    """Seconds for ``steps`` updates (one timed run)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        info = agent.update(batch)
    float(info["total_loss"])  # host sync
    _sync(device)
    return time.perf_counter() - t0


def act_latency_ms(agent: QCAgent, device: str, n: int = 20) -> float:
    obs = torch.randn(1, OBS_DIM)
    agent.act(obs)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        agent.act(obs)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def choice_agreement_lines(states: int, device: str) -> list[str]:
    """How often bf16 Euler + fp32 ranking keeps the all-fp32 best-of-N choice (reference size)."""
    hidden, n, steps = [512] * 4, 32, 10
    flow = trained_like_flow(OBS_DIM, 5 * ACT_DIM, hidden, updates=300, batch=256)
    fast = FastFlow(flow, torch.bfloat16, fused_linear_available(torch.device(device), torch.bfloat16))
    fast.refresh()
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(states, OBS_DIM, generator=g)
    noise = torch.randn(states, n, 5 * ACT_DIM, generator=g)
    cases = [(lv, sg) for lv in (-100.0, -150.0, -200.0) for sg in (0.5, 1.0, 3.0)]
    rows = choice_agreement(flow, lambda o, z: fast.sample(o, z, steps), obs, noise, steps, hidden, cases)
    lines = [
        "",
        f"Best-of-N choice with bf16 Euler passes vs all fp32 ({states} states × N = {n}, reference "
        "networks: a flow fitted for 300 updates to a 4-mode chunk distribution, a critic rescaled to "
        "mean Q = level with within-state std σ over the candidates):",
        "",
        "| mean Q | σ | max abs Δa (bf16 Euler) | same choice, bf16 Euler + fp32 ranking | same choice, bf16 ranking (old) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['q_mean']:.0f} | {r['sigma']:g} | {r['max_abs_da']:.4f} | "
                     f"{100 * r['match']:.1f}% | {100 * r['bf16_rank_match']:.1f}% |")
    return lines


def machine() -> str:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    info = open("/proc/cpuinfo").read()
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info] or ["no bf16"]
    return (
        f"{model} ({', '.join(flags)}), nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count()],
                   help="torch thread counts to time (default: all cores)")
    p.add_argument("--configs", nargs="+", default=["reference"], choices=sorted(SETTINGS))
    p.add_argument("--actors", nargs="+", default=["best_of_n", "fql"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                   help="dtype of the flow's Euler passes (ranking is fp32 always)")
    p.add_argument("--compile", action="store_true", help="also time cfg.compile=True (slow to build)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--agreement-states", type=int, default=512, help="0: skip the choice-agreement check")
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args()
    dev = args.device
    load0 = os.getloadavg()
    lines = [
        "# QCAgent.update throughput",
        "",
        f"Machine: {machine()}; device {dev}.",
        "",
        f"Agent: obs_dim {OBS_DIM}, act_dim {ACT_DIM}, horizon 5, batch 256, N 32, flow_steps 10, "
        "2 critics; best-of-N ranked by the fp32 critic; synthetic batches. Baseline (module path, "
        "`fast_sampling=False`) and fused sampler timed in the same run, interleaved run by run; "
        f"updates/s = steps / median of {args.repeats} runs (slowest run in brackets).",
        "",
        "| setting | actor | Euler dtype | sampler | compile | threads | updates/s (slowest) | act latency (B=1, ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for threads, key in ((t, k) for t in args.threads for k in args.configs):
        torch.set_num_threads(threads)
        s = SETTINGS[key]
        for actor in args.actors:
            for dtype in args.dtypes:
                for comp in [False, True] if args.compile else [False]:
                    bon = actor == "best_of_n"
                    variants = [("module", False), ("fused", True)]
                    agents = {}
                    for label, fast in variants:
                        cfg = AgentConfig(actor_type=actor, hidden_dims=s.hidden, sample_dtype=dtype,
                                          compile=comp, fast_sampling=fast, device=dev)
                        agents[label] = QCAgent(cfg, OBS_DIM, ACT_DIM, seed=0)
                    batch = synthetic_batch(agents["module"].cfg, device=dev)
                    steps = (2 if key == "reference" else 5) if bon else 10
                    warm = (3 if comp else 1) if bon else (5 if comp else 3)
                    for ag in agents.values():
                        for _ in range(warm):
                            ag.update(batch)
                    runs: dict[str, list[float]] = {k: [] for k in agents}
                    for _ in range(args.repeats):  # interleaved: both see the same load
                        for k, ag in agents.items():
                            runs[k].append(time_updates(ag, batch, steps, dev))
                    for k, ag in agents.items():
                        ups = steps / statistics.median(runs[k])
                        worst = steps / max(runs[k])
                        lat = act_latency_ms(ag, dev)
                        row = (f"| {s.name} | {actor} | {dtype} | {k} | {'on' if comp else 'off'} | {threads} "
                               f"| {ups:.2f} ({worst:.2f}) | {lat:.2f} |")
                        lines.append(row)
                        print(row, flush=True)
    load1 = os.getloadavg()
    if args.agreement_states:
        notes = choice_agreement_lines(args.agreement_states, dev)
        print("\n".join(notes), flush=True)
        lines += notes
    notes = [
        "",
        f"Load average (1 min) before/after: {load0[0]:.2f} / {load1[0]:.2f} "
        "(other processes may have shared the cores).",
    ]
    print("\n".join(notes))
    lines += notes
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
