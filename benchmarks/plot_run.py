"""One training run as a picture: evaluation success and the training losses, against updates.

    python benchmarks/plot_run.py runs/ship-cube-single --png docs/img/main_job_curve.png

Reads the run's ``eval.csv`` (success over the evaluation episodes at each evaluation) and
``metrics.csv`` (critic loss, mean Q, flow BC loss every ``log_interval`` updates). A run resumed
after an interruption repeats the rows logged after its last checkpoint; the latest row per step
is kept (the resumed run recomputes them from the checkpoint).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def latest_per_step(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    by_step: dict[int, dict[str, str]] = {}
    for r in rows:
        by_step[int(float(r["step"]))] = r
    return [by_step[s] for s in sorted(by_step)]


def plot(run_dir: Path, out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = latest_per_step(list(csv.DictReader((run_dir / "eval.csv").open())))
    metrics = latest_per_step(list(csv.DictReader((run_dir / "metrics.csv").open())))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    steps = [int(float(r["step"])) for r in evals]
    success = [float(r["eval/success"]) for r in evals]
    ax1.plot(steps, success, marker="o", color="tab:blue")
    offline = [int(float(r["step"])) for r in evals if float(r["env_steps"]) == 0]
    first_online = max(offline) if offline and len(offline) < len(evals) else None  # the phase boundary
    for ax in (ax1, ax2):
        if first_online is not None:
            ax.axvline(first_online, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
    if first_online is not None:
        ax1.text(first_online, 1.02, " online →", va="bottom", fontsize=9, color="grey")
    n = evals[-1].get("episodes", "")
    ax1.set_ylabel("success rate" + (f" ({n} episodes)" if n else ""))
    ax1.set_ylim(-0.02, 1.0)
    import textwrap

    ax1.set_title(textwrap.fill(title or run_dir.name, 80), fontsize=9, pad=14)
    ms = [int(float(r["step"])) for r in metrics]
    ax2.plot(ms, [float(r["critic/loss"]) for r in metrics], label="critic loss", color="tab:red")
    ax2.plot(ms, [float(r["actor/bc_flow_loss"]) for r in metrics], label="flow BC loss", color="tab:green")
    ax2.set_ylabel("loss")
    ax2.set_xlabel("gradient updates")
    ax3 = ax2.twinx()
    ax3.plot(ms, [float(r["critic/q_mean"]) for r in metrics], label="mean Q", color="tab:purple", alpha=0.6)
    ax3.set_ylabel("mean Q")
    lines = [ln for ln in ax2.get_lines() + ax3.get_lines() if not ln.get_label().startswith("_")]
    ax2.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    print(plot(a.run_dir, a.png, a.title))


if __name__ == "__main__":
    main()
