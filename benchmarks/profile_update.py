"""Where a QC-FQL update's time goes, and what would make it faster (issue 11's 20 updates/s).

    python benchmarks/profile_update.py [--threads 2] [--out docs/benchmarks_profile.md]

At the reference config (4×512, batch 256, h = 5, 2 critics, QC-FQL, synthetic batches):

1. the matmul FLOPs of one update (``torch.utils.flop_counter``), split into the fp32 gradient
   passes and the no-grad bf16 distillation target;
2. a ``torch.profiler`` breakdown of the update's CPU time by kind of op, and the fp32 GEMMs'
   achieved GFLOP/s;
3. updates/s of the default update, with ``agent.compile=true``, and under bf16 autocast (the
   gradient passes in bf16: not the reference's algorithm, timed only to size the option),
   interleaved in the same run (median of ``--repeats`` runs; slowest in brackets).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from bench_update import ACT_DIM, OBS_DIM, machine, synthetic_batch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from qc_robot.agent.agent import QCAgent
from qc_robot.config import AgentConfig
from qc_robot.data.batch import ChunkBatch

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def make_agent(compile_: bool = False) -> tuple[QCAgent, ChunkBatch]:
    cfg = AgentConfig(actor_type="fql", hidden_dims=[512] * 4, batch_size=256, horizon=5, compile=compile_)
    return QCAgent(cfg, OBS_DIM, ACT_DIM, seed=0), synthetic_batch(cfg)


def flops(agent: QCAgent, batch: ChunkBatch) -> tuple[float, float]:
    """(fp32 matmul FLOPs of the gradient passes, FLOPs of the bf16 distillation target) of one
    update. The counter does not see the fused sampler's oneDNN calls: the target is counted from
    the flow's weights (flow_steps Euler passes of 2·B·in·out per layer)."""
    with FlopCounterMode(display=False) as fc:
        agent.update(batch)
    per_pass = sum(2 * agent.cfg.batch_size * m.weight.numel() for m in agent.flow.modules()
                   if isinstance(m, torch.nn.Linear))
    return float(fc.get_total_flops()), float(agent.cfg.flow_steps * per_pass)


def breakdown(agent: QCAgent, batch: ChunkBatch, n: int = 10) -> tuple[dict[str, float], float]:
    """ms per update by kind of op (self CPU time), and fp32-GEMM ms per update."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            info = agent.update(batch)
        float(info["total_loss"])
    kinds: dict[str, float] = defaultdict(float)
    fp32_gemm = 0.0
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / n
        if e.key in GEMM:
            if e.key == "mkldnn::_linear_pointwise":  # the fused sampler's bf16 GEMM + bias + GELU
                kinds["bf16 GEMMs (distillation target, no grad)"] += ms
            else:
                kinds["fp32 GEMMs (gradient passes)"] += ms
                fp32_gemm += ms
        elif "adam" in e.key.lower():
            kinds["optimizer (fused Adam)"] += ms
        elif e.key.startswith("aten::") and any(s in e.key for s in ("gelu", "layer_norm", "mul", "add", "sub",
                                                                     "copy", "sum", "lerp", "pow", "div", "clamp",
                                                                     "mean", "neg", "where", "fill", "zero")):
            kinds["elementwise and reductions"] += ms
        elif e.key.startswith(("aten::", "mkldnn::")):
            kinds["other ops"] += ms
    return dict(kinds), fp32_gemm


def time_updates(agent: QCAgent, batch: ChunkBatch, steps: int, autocast: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    t0 = time.perf_counter()
    with ctx:
        for _ in range(steps):
            info = agent.update(batch)
    float(info["total_loss"])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]

    agent, batch = make_agent()
    for _ in range(5):
        agent.update(batch)
    grad, target = flops(agent, batch)
    kinds, gemm_ms = breakdown(agent, batch)
    compiled, _ = make_agent(compile_=True)
    for _ in range(3):  # compiles
        compiled.update(batch)
    settings = {"default (fp32 gradient passes)": (agent, False), "agent.compile=true": (compiled, False),
                "bf16 autocast over the update": (agent, True)}
    for a, ac in settings.values():
        time_updates(a, batch, 3, ac)
    runs: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.repeats):  # interleaved
        for name, (a, ac) in settings.items():
            runs[name].append(time_updates(a, batch, args.steps, ac))
    load1 = os.getloadavg()[0]

    grad_gflop = grad / 1e9
    lines = [
        "# Where a QC-FQL update's time goes (`benchmarks/profile_update.py`)",
        "",
        f"Machine: {machine()}; {args.threads} threads; load average (1 min) {load0:.2f} before, "
        f"{load1:.2f} after.",
        "",
        "QC-FQL at the reference config (4×512, batch 256, h = 5, 2 critics, 10 flow steps), synthetic batches.",
        "",
        f"Matmul work per update: **{grad_gflop:.2f} GFLOP in the fp32 gradient passes** (critic ensemble "
        "forward and backward, target critic, flow, one-step actor, the Q loss through the critic) and "
        f"{target / 1e9:.2f} GFLOP in the no-grad bf16 distillation target.",
        "",
        "| kind of op | ms per update |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += [f"| **total (profiled)** | **{sum(kinds.values()):.1f}** |", "",
              f"The fp32 GEMMs run at **{grad_gflop / (gemm_ms / 1e3):.0f} GFLOP/s** "
              f"({gemm_ms:.1f} ms per update): at that rate they alone allow "
              f"{1e3 / gemm_ms:.1f} updates/s, with every other op free.", "",
              "| setting | updates/s (slowest run) |", "|---|---|"]
    for name, ts in runs.items():
        lines.append(f"| {name} | {args.steps / statistics.median(ts):.2f} ({args.steps / max(ts):.2f}) |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
