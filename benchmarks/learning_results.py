"""Summarize learning runs (their ``eval.csv``) into a markdown table and one figure per task.

    python benchmarks/learning_results.py runs/cube-single-task1-qc runs/cube-single-task1-qc_fql \
        --png docs/img/learning_cube-single-task1.png

Each run directory is one `qc-robot train` run. The table gives success at the end of the offline
phase and at the end of the online phase (the same evaluation episodes for both).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_run(run_dir: Path) -> dict:
    rows = list(csv.DictReader((run_dir / "eval.csv").open()))
    evals = [(int(r["step"]), int(r["env_steps"]), r["phase"], float(r["eval/success"])) for r in rows]
    offline = [e for e in evals if e[2] == "offline"]
    online = [e for e in evals if e[2] == "online"]
    import torch

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    return {"dir": run_dir, "evals": evals, "cfg": cfg,
            "offline_end": offline[-1] if offline else None, "online_end": online[-1] if online else None}


def table(runs: list[dict]) -> str:
    lines = ["| run | agent | task | offline updates | success after offline | online env steps | success after online |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        cfg = r["cfg"]
        off, on = r["offline_end"], r["online_end"]
        off_s = f"{off[0]} | {off[3]:.2f}" if off else "0 | –"
        on_s = f"{on[1]} | {on[3]:.2f}" if on else "0 | –"
        lines.append(f"| {r['dir'].name} | {cfg['agent']['actor_type']} | {cfg['env']['name']} | {off_s} | {on_s} |")
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for r in runs:
        xs = [e[0] for e in r["evals"]]
        ys = [e[3] for e in r["evals"]]
        kind = r["cfg"]["agent"]["actor_type"]
        label = {"best_of_n": "QC (best-of-N)", "fql": "QC-FQL"}.get(kind, r["dir"].name)
        style = {"best_of_n": dict(marker="s", ls="--"), "fql": dict(marker="o", ls="-")}.get(kind, {})
        ax.plot(xs, ys, label=label, alpha=0.85, **style)
        if r["offline_end"] and r["online_end"]:
            ax.axvline(r["offline_end"][0], color="grey", ls=":", lw=1)
    ax.set_xlabel("gradient updates (offline, then one per online env step)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(runs[0]["cfg"]["env"]["name"] + ": offline → online", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="also print the raw evaluations")
    args = p.parse_args()
    runs = [read_run(d) for d in args.runs]
    print(table(runs))
    if args.json:
        print(json.dumps({str(r["dir"]): r["evals"] for r in runs}, indent=1))
    if args.png:
        plot(runs, args.png)
        print(f"\n![learning curves]({args.png})")


if __name__ == "__main__":
    main()
