"""What images cost the agent: acting latency in onnxruntime, update throughput, replay memory.

For each image size (default 64x64 and 128x128, one RGB camera beside a 28-D state) and actor
type, a random-weight policy with the default encoder (``VisionConfig``: IMPALA stacks 16/32/32, one
residual block each, 256-D feature) and the CPU-sized networks of ``experiment=cpu_small``
(3x256, N=16, 10 flow steps, h=5, A=5) is exported and timed through ``OnnxPolicy.predict`` (what
the control server calls: checks, feed, session.run; noise drawn in the graph), against the same
policy without the camera (baseline, same run, interleaved rounds): the difference is the
encoder's cost per tick. Then ``QCAgent.update`` at batch 256 with and without the camera, and
the bytes a replay of image transitions holds per row (measured on a filled ``ChunkReplay``).

    python benchmarks/bench_image_policy.py --out docs/benchmarks_image_policy.md
    python benchmarks/bench_image_policy.py --sizes 64 --updates 0     # latency only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import machine_info, timeit_interleaved  # noqa: E402

from qc_robot.agent.agent import QCAgent  # noqa: E402
from qc_robot.config import AgentConfig  # noqa: E402
from qc_robot.data.replay import ChunkReplay  # noqa: E402
from qc_robot.export.onnx_export import build_metadata, export_policy  # noqa: E402
from qc_robot.policies.base import ObsField  # noqa: E402
from qc_robot.policies.onnx_policy import OnnxPolicy  # noqa: E402

STATE, ACT = 28, 5


def agent_cfg(actor_type: str, batch: int) -> AgentConfig:
    return AgentConfig(actor_type=actor_type, hidden_dims=[256, 256, 256], num_samples=16, batch_size=batch,
                       device="cpu", sample_dtype="float32")


def make_agent(actor_type: str, size: int | None, batch: int = 256) -> QCAgent:
    shapes = {"image": (size, size, 3)} if size else None
    return QCAgent(agent_cfg(actor_type, batch), STATE, ACT, seed=0, image_shapes=shapes)


def export(agent: QCAgent, size: int | None, path: Path) -> OnnxPolicy:
    fields = [ObsField("state", (STATE,))] + ([ObsField("image", (size, size, 3), "uint8")] if size else [])
    acting = agent.acting_policy().eval()
    meta = build_metadata(acting, fields, -np.ones(ACT), np.ones(ACT), 20.0, agent.cfg.num_samples, rtc=False)
    return OnnxPolicy(export_policy(acting, meta, path), threads=1, warmup=20)


def latency(sizes: list[int], calls: int, tmp: Path) -> list[str]:
    rows = []
    rng = np.random.default_rng(0)
    for actor_type in ("best_of_n", "fql"):
        pols = {"state only (baseline)": export(make_agent(actor_type, None), None, tmp / f"{actor_type}.onnx")}
        for s in sizes:
            pols[f"{s}x{s}"] = export(make_agent(actor_type, s), s, tmp / f"{actor_type}_{s}.onnx")
        obs = {"state": rng.normal(size=STATE).astype(np.float32)}
        frames = {s: rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in sizes}

        def call(p: OnnxPolicy, o: dict[str, np.ndarray]) -> None:
            p.predict(o)

        fns = {}
        for name, p in pols.items():
            o = dict(obs)
            if name != "state only (baseline)":
                o["image"] = frames[int(name.split("x")[0])]
            fns[name] = lambda p=p, o=o: call(p, o)
        res = timeit_interleaved(fns, calls)
        base = res["state only (baseline)"][0]
        for name, (p50, p99, cpu) in res.items():
            extra = "" if name.startswith("state") else f"{p50 - base:+.2f}"
            rows.append(f"| {actor_type} | {name} | {p50:.2f} | {p99:.2f} | {cpu:.2f} | {extra} |")
    return rows


def updates(sizes: list[int], n: int, batch: int) -> list[str]:
    rows = []
    rng = np.random.default_rng(0)
    for actor_type in ("best_of_n", "fql"):
        for size in [None, *sizes]:
            agent = make_agent(actor_type, size, batch)
            rows_n = 2 * batch
            shapes = {"image": (size, size, 3)} if size else {}
            rp = ChunkReplay(STATE, ACT, rows_n, image_shapes=shapes)
            data = {"observations": rng.normal(size=(rows_n, STATE)).astype(np.float32),
                    "actions": rng.uniform(-1, 1, (rows_n, ACT)).astype(np.float32),
                    "rewards": -np.ones(rows_n, np.float32),
                    "terminals": (np.arange(rows_n) % 100 == 99).astype(np.float32),
                    "masks": np.ones(rows_n, np.float32),
                    "next_observations": rng.normal(size=(rows_n, STATE)).astype(np.float32)}
            for g in ("images", "next_images"):
                for k, sh in shapes.items():
                    data[f"{g}/{k}"] = rng.integers(0, 256, (rows_n, *sh), dtype=np.uint8)
            rp.add_offline(data)
            gen = torch.Generator().manual_seed(0)
            agent.update(rp.sample(batch, 5, 0.99, generator=gen))  # warm-up
            times = []
            for _ in range(n):
                b = rp.sample(batch, 5, 0.99, generator=gen)
                t0 = time.perf_counter()
                agent.update(b)
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            name = "state only (baseline)" if size is None else f"{size}x{size}"
            rows.append(f"| {actor_type} | {name} | {1.0 / med:.2f} | {med * 1e3:.0f} |")
    return rows


def memory(sizes: list[int], rows_n: int) -> list[str]:
    out = []
    for size in [None, *sizes]:
        shapes = {"image": (size, size, 3)} if size else {}
        rp = ChunkReplay(STATE, ACT, rows_n, image_shapes=shapes)
        per_row = sum(t.element_size() * t[0].numel() for t in rp._data.values())
        img = sum(t.element_size() * t[0].numel() for k, t in rp._data.items() if "images/" in k)
        name = "state only" if size is None else f"{size}x{size}"
        out.append(f"| {name} | {per_row:,} | {img:,} | {per_row * 1_000_000 / 2**30:.1f} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--updates", type=int, default=5, help="timed updates per row (0: skip)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the update rows")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="bench_image_"))
    lines = ["# Image policies: `benchmarks/bench_image_policy.py`", "", info, "",
             "## Acting latency, one observation (onnxruntime, 1 thread, `OnnxPolicy.predict`)", "",
             "| actor | camera | p50 ms | p99 ms | CPU p50 ms | encoder cost p50 ms |", "|---|---|---|---|---|---|"]
    lines += latency(args.sizes, args.calls, tmp)
    if args.updates:
        lines += ["", f"## `QCAgent.update`, batch {args.batch}, {args.threads} torch threads, fp32, median of "
                  f"{args.updates}", "", "| actor | camera | updates/s | ms per update |", "|---|---|---|---|"]
        lines += updates(args.sizes, args.updates, args.batch)
    lines += ["", "## Replay memory per transition (s and s' frames stored, uint8)", "",
              "| camera | bytes per row | of which images | GiB per 1M rows |", "|---|---|---|---|"]
    lines += memory(args.sizes, 16)
    lines += ["", f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
