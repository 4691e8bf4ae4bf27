"""Play-data episodes/s: ``datagen workers=1`` (the default one-stream path, and the per-episode
seeding mode) against ``workers=2`` / ``workers=1`` on Ray actors, same run.

    python benchmarks/bench_cluster_datagen.py [--episodes 8] [--length 200] [--repeats 2]

Times :func:`qc_robot.sim.datagen.generate` as the CLI calls it, interleaved repeat by repeat.
One local Ray instance serves every Ray repeat (its start-up is reported on its own); each Ray
repeat starts its actors afresh, so their start-up (imports, env build) is inside the timed span,
as in a real ``datagen workers=N`` call. Every Ray file is checked equal to the in-process
per-episode file, array by array. Episodes/s = episodes / median run time.
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

TASK = "cube-double-task1"


def _arrays(path: Path) -> dict[str, bytes]:
    import h5py

    out: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes())
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--length", type=int, default=200, help="steps per episode")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray

    from qc_robot.sim.datagen import generate

    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_dg_"))
    n = args.episodes
    runs = {"sequential (default, one stream)": {},
            "sequential, per_episode_seed": {"per_episode_seed": True},
            "ray x1": {"workers": 1, "ray_address": "local"},
            "ray x2": {"workers": 2}}
    generate(TASK, 1, 5, 0.1, 0, str(tmp / "warm.hdf5"), progress=False)  # imports, first env build: untimed
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, configure_logging=False)
    ray_start = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        files: dict[str, Path] = {}
        for k, kw in runs.items():
            files[k] = out = tmp / f"{rep}_{len(files)}.hdf5"
            # ray x1: generate() runs on Ray when given an address; Ray is already up here, so the
            # value only selects that path (run_tasks joins the running instance)
            t = time.perf_counter()
            generate(TASK, n, args.length, 0.1, 0, str(out), progress=False, **kw)  # type: ignore[arg-type]
            times[k].append(time.perf_counter() - t)
            if "workers" in kw:
                assert _arrays(out) == _arrays(files["sequential, per_episode_seed"]), f"{k} differs"
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)
    ray.shutdown()
    load_after = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    base = statistics.median(times["sequential (default, one stream)"])
    rows = [f"| {k} | {n / statistics.median(v):.2f} | {n / max(v):.2f} | "
            f"{n * args.length / statistics.median(v):.0f} | {base / statistics.median(v):.2f} |"
            for k, v in times.items()]
    print("\n".join([
        "",
        f"Machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, ray {ray.__version__}, "
        f"python {platform.python_version()}; `{Path(__file__).name} --episodes {n} --length {args.length} "
        f"--repeats {args.repeats}`. {n} episodes of {TASK} play data, {args.length} steps each; the local Ray "
        f"instance took {ray_start:.1f} s to start (not in the rows). Every Ray file equalled the per-episode one.",
        "",
        "| path | episodes/s (median) | episodes/s (slowest run) | env steps/s | ratio to the default |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Load average (1, 5, 15 min) before / after: {load_before} | {load_after}.",
        "Per-repeat times (s): " + "; ".join(f"{k}: " + " / ".join(f"{x:.1f}" for x in v) for k, v in times.items()),
    ]))


if __name__ == "__main__":
    main()
