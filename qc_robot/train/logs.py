"""Run logs: metrics CSV (always), TensorBoard (when installed), and a learning-curve PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class RunLogger:
    """Append-only metrics for one run directory.

    ``metrics.csv`` gets one row per log call (columns grow as new keys appear: the file is
    rewritten then, which happens only a handful of times per run). ``eval.csv`` and
    ``learning_curve.png`` track evaluations.
    """

    def __init__(self, run_dir: str | Path, resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.csv"
        self.eval_path = self.dir / "eval.csv"
        self._rows: list[dict[str, Any]] = []
        self._evals: list[dict[str, Any]] = []
        if resume:
            self._rows = _read_csv(self.metrics_path)
            self._evals = _read_csv(self.eval_path)
        else:
            for p in (self.metrics_path, self.eval_path):
                p.unlink(missing_ok=True)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
        except Exception:  # tensorboard not installed: CSV and PNG are enough
            self._tb = None

    def forget_after(self, step: int) -> None:
        """Drop the rows logged after ``step``: a run resumed from a checkpoint at ``step`` logs
        them again (a crash between saves must not leave them twice)."""
        for rows, path in ((self._rows, self.metrics_path), (self._evals, self.eval_path)):
            kept = [r for r in rows if int(float(r["step"])) <= step]
            if len(kept) < len(rows):
                rows[:] = kept
                _write_csv(path, rows)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self._rows.append(row)
        _write_csv(self.metrics_path, self._rows)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def log_eval(self, step: int, env_steps: int, phase: str, metrics: dict[str, float]) -> None:
        self._evals.append({"step": step, "env_steps": env_steps, "phase": phase, **metrics})
        _write_csv(self.eval_path, self._evals)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        self.plot()

    def plot(self) -> Path | None:
        """learning_curve.png: eval success against updates, offline and online phases marked."""
        if not self._evals:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for phase, marker in (("offline", "o"), ("online", "s")):
            pts = [(int(r["step"]), float(r["eval/success"])) for r in self._evals if r["phase"] == phase]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=phase)
        ax.set_xlabel("gradient updates")
        ax.set_ylabel("success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(self.dir.name, fontsize=9)
        fig.tight_layout()
        out = self.dir / "learning_curve.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))
