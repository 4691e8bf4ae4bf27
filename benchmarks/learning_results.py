"""Summarize learning runs (their ``eval.csv``) into a markdown table and one figure per task.

    python benchmarks/learning_results.py runs/cube-single-task1-qc runs/cube-single-task1-qc_fql \
        --png docs/img/learning_cube-single-task1.png

Each run directory is one `qc-robot train` run. The table gives success at the end of the offline
phase and at the end of the online phase (the same evaluation episodes for both). With
``--seeds`` the runs are seeds of the same settings: success is aggregated per (task, agent) as
the mean with a 95 % t-interval over seeds and as pooled episodes with a Wilson interval, and
the figure shows each seed and their mean.
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


def _mean_ci(xs: list[float]) -> str:
    """Mean and 95 % t-interval over seeds."""
    import statistics

    m = statistics.fmean(xs)
    if len(xs) < 2:
        return f"{m:.2f}"
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(xs), 2.57)
    half = t95 * statistics.stdev(xs) / len(xs) ** 0.5
    return f"{m:.2f} [{max(0.0, m - half):.2f}, {min(1.0, m + half):.2f}]"


def _wilson(k: int, n: int) -> str:
    if n == 0:
        return "–"
    z, p = 1.96, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return f"{k}/{n} ({max(0.0, c - h):.2f}–{min(1.0, c + h):.2f})"


def seed_table(runs: list[dict]) -> str:
    """One row per (task, agent): success after the offline and the online phase over the seeds,
    mean with a 95 % t-interval over seeds, and the pooled episodes with a Wilson interval."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["cfg"]["env"]["name"], r["cfg"]["agent"]["actor_type"]), []).append(r)
    lines = ["| task | agent | seeds | after offline: mean [95% CI over seeds] | pooled episodes | "
             "after online: mean [95% CI over seeds] | pooled episodes |", "|---|---|---|---|---|---|---|"]
    for (task, actor), rs in sorted(groups.items()):
        cells = []
        for key in ("offline_end", "online_end"):
            ends = [r[key] for r in rs if r[key]]
            rates = [e[3] for e in ends]
            n_ep = [int(r["cfg"]["training"]["eval_episodes"]) for r in rs if r[key]]
            k = sum(round(rate * n) for rate, n in zip(rates, n_ep, strict=True))
            cells += [_mean_ci(rates) if rates else "–", _wilson(k, sum(n_ep))]
        name = {"best_of_n": "QC (best-of-N)", "fql": "QC-FQL"}.get(actor, actor)
        lines.append(f"| {task} | {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_seeds(runs: list[dict], out: Path) -> None:
    """Mean success over seeds per agent (lines), each seed faint, the offline/online boundary dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    by_agent: dict[str, list[dict]] = {}
    for r in runs:
        by_agent.setdefault(r["cfg"]["agent"]["actor_type"], []).append(r)
    for i, (kind, rs) in enumerate(sorted(by_agent.items())):
        color = f"C{i}"
        label = {"best_of_n": "QC (best-of-N)", "fql": "QC-FQL"}.get(kind, kind)
        steps = sorted({e[0] for r in rs for e in r["evals"]})
        curves = []
        for r in rs:
            d = {e[0]: e[3] for e in r["evals"]}
            ax.plot([s for s in steps if s in d], [d[s] for s in steps if s in d], color=color, alpha=0.25, lw=1)
            curves.append([d.get(s, np.nan) for s in steps])
        ax.plot(steps, np.nanmean(np.asarray(curves), axis=0), color=color, lw=2, marker="o", ms=3,
                label=f"{label} (mean of {len(rs)} seeds)")
        if rs[0]["offline_end"] and rs[0]["online_end"]:
            ax.axvline(rs[0]["offline_end"][0], color="grey", ls=":", lw=1)
    ax.set_xlabel("gradient updates (offline, then one per online env step)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(runs[0]["cfg"]["env"]["name"] + ": offline → online, per seed (faint) and mean", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="also print the raw evaluations")
    p.add_argument("--seeds", action="store_true",
                   help="runs are seeds: aggregate per (task, agent) and plot means (one task per --png)")
    args = p.parse_args()
    runs = [read_run(d) for d in args.runs]
    print(table(runs))
    if args.seeds:
        print()
        print(seed_table(runs))
        if args.png:
            plot_seeds(runs, args.png)
            print(f"\n![learning curves]({args.png})")
        return
    if args.json:
        print(json.dumps({str(r["dir"]): r["evals"] for r in runs}, indent=1))
    if args.png:
        plot(runs, args.png)
        print(f"\n![learning curves]({args.png})")


if __name__ == "__main__":
    main()
