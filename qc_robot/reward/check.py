"""``qc-robot reward FILE... check=reward.onnx``: measure an exported detector on labelled
episodes it never saw (every episode is held out), through the same onnxruntime graph and
decision rule the robot runs. The held-out split of training is a quarter of the data it was
trained from; this is how a user measures it on today's episodes, or on many more than a split holds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from qc_robot.policies.success_detector import SuccessDetector
from qc_robot.reward.data import load_labelled
from qc_robot.reward.metrics import SWEEP, episode_metrics, frame_metrics, summary_line

CHECK_SWEEP = (*SWEEP, 0.995, 0.999)
"""Training's sweep, finer at the top, where a threshold for a low false-positive target lies."""


def binomial_upper(k: int, n: int, confidence: float = 0.95) -> float | None:
    """One-sided Clopper-Pearson upper bound on a rate seen ``k`` times in ``n`` (None for n = 0):
    the p at which seeing ``k`` or fewer has probability 1 - confidence."""
    if n == 0:
        return None
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:  # P(X <= k), X ~ Binomial(n, p), in log space (n may be thousands)
        if p <= 0.0:
            return 1.0
        lp, lq = math.log(p), math.log1p(-p)
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
                   for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):  # cdf falls as p rises: bisect for cdf(p) = 1 - confidence
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1.0 - confidence else (lo, mid)
    return hi


def detector_probabilities(det: SuccessDetector, state: np.ndarray, images: dict[str, np.ndarray],
                           batch: int = 4096) -> np.ndarray:
    """P(success) of each frame through the exported graph, in batches; NaN where a frame's input
    or output is not finite (the runtime gives such a frame no reward)."""
    out = np.concatenate([det.probabilities(state[lo:lo + batch], {k: v[lo:lo + batch] for k, v in images.items()})
                          for lo in range(0, len(state), batch)]) if len(state) else np.zeros(0, np.float32)
    out[~np.isfinite(state).all(axis=1)] = np.nan
    return out


def check_detector(path: str, files: list[str]) -> dict[str, Any]:
    """Rates of the detector at ``path`` on every labelled episode of ``files``, at its stored
    threshold and debounce and at each threshold of :data:`CHECK_SWEEP`, with the one-sided 95%
    upper bound of the per-episode false-positive rate."""
    det = SuccessDetector.load(path)
    m = det.meta
    frames = load_labelled(files, [f.key for f in m.obs_fields], m.positive_frames, m.gap_frames)
    det.check_spec(frames.obs_fields)  # a file from another robot: one line naming what differs
    prob = detector_probabilities(det, frames.state, frames.images)
    episodes = np.arange(frames.num_episodes)
    trained_on = {Path(p).resolve() for p in (m.metrics.get("data") or [])}
    overlap = sorted(str(p) for p in files if Path(p).resolve() in trained_on)

    def at(threshold: float) -> dict[str, Any]:
        e = episode_metrics(prob, frames.episode, frames.labels, frames.success, episodes, threshold, det.debounce)
        e["fpr_upper95"] = binomial_upper(e["fp"], e["fp"] + e["tn"])
        return e

    return {
        "detector": str(path), "data": list(files), "threshold": det.threshold, "debounce": det.debounce,
        "episodes": int(frames.num_episodes), "successes": int(frames.success.sum()),
        "frame": frame_metrics(prob, frames.labels, det.threshold),
        "episode": at(det.threshold),
        "episode_sweep": [{"threshold": t, **{k: v for k, v in at(t).items()
                                              if k in ("precision", "recall", "fpr", "fp", "tp", "fpr_upper95",
                                                       "early_fires")}}
                          for t in CHECK_SWEEP],
        "trained_on_these_files": overlap,
        "nan_frames": int(np.isnan(prob).sum()),
    }


def run_check(path: str, files: list[str], report: str = "") -> int:
    """CLI: measure, print, and write the JSON to ``report`` when given."""
    r = check_detector(path, files)
    e = r["episode"]
    print(f"detector {path} on {r['episodes']} episodes ({r['successes']} successes) of {len(files)} file(s); "
          f"threshold {r['threshold']:g}, debounce {r['debounce']}")
    if r["trained_on_these_files"]:
        print(f"note: it was trained on {r['trained_on_these_files']}: these rates are not held out")
    print(summary_line("frames", r["frame"]))
    print(summary_line("episodes", e) + f", false-positive rate <= {_pct(e['fpr_upper95'])} (95% upper bound); "
          f"early fires {e['early_fires']} (successes it would have ended as one before they happened)")
    print("episodes by threshold: " + ", ".join(
        f"{s['threshold']:g}: recall {_pct(s['recall'])} fpr {_pct(s['fpr'])} (<= {_pct(s['fpr_upper95'])}) "
        f"early {s['early_fires']}" for s in r["episode_sweep"]))
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(r, indent=2) + "\n")
        print(f"written to {report}")
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
