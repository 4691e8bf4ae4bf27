"""Held-out quality of a success detector, per frame and per episode (numpy only).

Per frame: each labelled frame (the gap before a success's positives is left out) is predicted
positive when its probability is at least the threshold; no debounce.

Per episode: the detector runs over the whole episode from its first frame as on the robot
(threshold and debounce, :func:`qc_robot.policies.success_detector.first_fire`); an episode is
flagged when it fires anywhere. Truth is the episode's label. A flagged failure is the costly
error: on the robot it ends the episode with a success reward the robot did not earn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qc_robot.policies.success_detector import first_fire
from qc_robot.reward.data import IGNORED, POSITIVE

SWEEP = (0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
"""Thresholds at which the held-out per-episode rates are also reported (to pick one for a
target false-positive rate without retraining: ``drive`` can override the file's)."""


def rates(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """precision, recall, false-positive rate and F1 of boolean predictions (None where a rate
    has no denominator), with the counts."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp, fp = int(np.sum(pred & truth)), int(np.sum(pred & ~truth))
    fn, tn = int(np.sum(~pred & truth)), int(np.sum(~pred & ~truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    fpr = fp / (fp + tn) if fp + tn else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else
          (0.0 if tp + fn and tp == 0 else None))
    return {"precision": precision, "recall": recall, "fpr": fpr, "f1": f1,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def frame_metrics(prob: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per-frame rates on the labelled frames (``labels`` POSITIVE/NEGATIVE; IGNORED left out)."""
    used = labels != IGNORED
    out = rates(prob[used] >= threshold, labels[used] == POSITIVE)
    out["frames"] = int(used.sum())
    return out


def episode_metrics(prob: np.ndarray, episode: np.ndarray, labels: np.ndarray, success: np.ndarray,
                    episodes: np.ndarray, threshold: float, debounce: int) -> dict[str, Any]:
    """Per-episode rates over ``episodes`` (frames in order within each), plus:

    ``early_fires``: successes where it fired before the positive frames and their gap (it would
    have ended the episode before the success); ``fire_lead_frames``: for flagged successes,
    the mean number of frames from the firing to the episode's end (0: at the last frame).
    """
    flagged, lead, early = [], [], 0
    for e in episodes:
        rows = np.flatnonzero(episode == e)
        at = first_fire(prob[rows], threshold, debounce)
        flagged.append(at is not None)
        if at is not None and success[e]:
            lead.append(len(rows) - 1 - at)
            first_labelled = int(np.flatnonzero(labels[rows] != 0)[0]) if (labels[rows] != 0).any() else len(rows)
            early += at < first_labelled
    out = rates(np.array(flagged, bool), success[episodes])
    out.update(episodes=int(len(episodes)), successes=int(success[episodes].sum()),
               early_fires=int(early), fire_lead_frames=float(np.mean(lead)) if lead else None)
    return out


def summary_line(name: str, m: dict[str, Any]) -> str:
    """'frames: precision 0.95 recall 0.90 fpr 0.010 f1 0.92 (tp 9 fp 1 tn 99 fn 1)'."""
    def fmt(v: Any, digits: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    return (f"{name}: precision {fmt(m['precision'])} recall {fmt(m['recall'])} fpr {fmt(m['fpr'])} "
            f"f1 {fmt(m['f1'])} (tp {m['tp']} fp {m['fp']} tn {m['tn']} fn {m['fn']})")
