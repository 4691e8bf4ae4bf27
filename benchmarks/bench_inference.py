"""Acting latency: torch eager vs the exported ONNX graph in onnxruntime, batch 1.

Random-weight networks at the reference config (hidden 4×512, N=32, flow_steps=10, H=5, A=5,
obs_dim 37) for both actor types; onnxruntime is timed through ``OnnxPolicy.predict`` (what the
control server calls: observation checks + concat + session.run, noise drawn in the graph),
torch eager through ``ActingPolicy`` with ``torch.randn`` noise. Also times the naive export
(the acting rule traced as written) against the lean one for best-of-N.

    python benchmarks/bench_inference.py --out docs/benchmarks_inference.md
    python benchmarks/bench_inference.py --providers cuda   # onnxruntime-gpu (and torch on cuda)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import qc_robot
from qc_robot.agent.acting import ActingPolicy
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor
from qc_robot.export.onnx_export import build_metadata, export_policy
from qc_robot.policies.base import ObsField
from qc_robot.policies.onnx_policy import OnnxPolicy


def make_acting(actor_type: str, args: argparse.Namespace) -> ActingPolicy:
    torch.manual_seed(0)
    d, hidden = args.horizon * args.action_dim, [args.hidden] * args.layers
    flow = FlowActor(args.obs_dim, d, hidden)
    critic = ChunkCritic(args.obs_dim, d, hidden) if actor_type == "best_of_n" else None
    one = OneStepActor(args.obs_dim, d, hidden) if actor_type == "fql" else None
    return ActingPolicy(
        actor_type, flow, critic, one, args.horizon, args.action_dim, args.flow_steps, "mean"
    ).eval()


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], calls: int, rounds: int = 20
) -> dict[str, tuple[float, float, float]]:
    """Wall p50, wall p99 and process-CPU p50 in ms per function.

    Calls are split into rounds that alternate between the functions, so load from other
    processes on a shared machine hits all of them alike. The CPU time (all threads of this
    process) is less sensitive to being descheduled: with one thread it is the compute time.
    """
    for fn in fns.values():
        for _ in range(20):  # warm-up
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(calls // rounds, 1)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {
        k: (
            float(np.percentile(v, 50) * 1e3),
            float(np.percentile(v, 99) * 1e3),
            float(np.median(cpu[k]) * 1e3),
        )
        for k, v in times.items()
    }


def machine_info() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"nproc {os.cpu_count()}, CPU {model}, load average at start {load}; python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"qc-robot {qc_robot.__version__}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--providers", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--action-dim", type=int, default=5)
    p.add_argument("--obs-dim", type=int, default=37)
    p.add_argument("--skip-naive", action="store_true", help="do not time the naive export")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args()

    device = "cuda" if args.providers == "cuda" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    info = machine_info()
    rows: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    fields = [ObsField("state", (args.obs_dim,))]
    low, high = -np.ones(args.action_dim, np.float32), np.ones(args.action_dim, np.float32)
    obs = {"state": np.random.default_rng(0).normal(size=args.obs_dim).astype(np.float32)}
    for actor_type in ("best_of_n", "fql"):
        acting = make_acting(actor_type, args)
        meta = build_metadata(acting, fields, low, high, 20.0, args.num_samples)
        graphs = {"onnxruntime": export_policy(acting, meta, tmp / f"{actor_type}.onnx")}
        if actor_type == "best_of_n" and not args.skip_naive:
            graphs["onnxruntime, naive export"] = export_policy(
                acting, meta, tmp / "naive.onnx", lean=False
            )
        acting_dev = acting.to(device)
        obs_t = torch.from_numpy(obs["state"])[None].to(device)  # (1, O)
        noise_shape = (1, *meta.noise_shape)

        def eager(
            net: ActingPolicy = acting_dev,
            x: torch.Tensor = obs_t,
            shape: tuple[int, ...] = noise_shape,
        ) -> None:
            with torch.inference_mode():
                net(x, torch.randn(shape, device=device))
                sync()

        for threads in args.threads:
            torch.set_num_threads(threads)
            fns: dict[str, Callable[[], object]] = {f"torch eager ({device})": eager}
            for name, path in graphs.items():
                policy = OnnxPolicy(path, providers=args.providers, threads=threads, warmup=20)
                prov = policy.provider.replace("ExecutionProvider", "")
                fns[f"{name} ({prov})"] = partial(policy.predict, obs)
            for name, (p50, p99, c50) in timeit_interleaved(fns, args.calls).items():
                rows.append(
                    f"| {actor_type} | {name} | {threads} | {p50:.3f} | {p99:.3f} | {c50:.3f} |"
                )
                print(rows[-1], flush=True)

    ref = (
        f"hidden {args.layers}×{args.hidden}, N={args.num_samples}, flow_steps={args.flow_steps}, "
        f"H={args.horizon}, A={args.action_dim}, obs_dim {args.obs_dim}"
    )
    table = "\n".join(
        [
            "| actor | runtime | threads | p50 ms | p99 ms | CPU p50 ms |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    md = (
        f"## Acting latency, batch 1 ({args.calls} calls each)\n\n"
        f"Config: {ref}; random weights.\n\nMachine: {info}.\n\n{table}\n"
    )
    print()
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)


if __name__ == "__main__":
    main()
