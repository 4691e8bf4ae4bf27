"""Run an exported success detector on the robot, each control step (numpy + onnxruntime only).

``qc-robot reward`` trains a per-frame success classifier on labelled episodes and exports it as
one self-describing ONNX file (:class:`DetectorMetadata` in ``metadata_props``): the observation
keys and shapes it reads, the normalization (inside the graph), the decision rule (``threshold``
on the probability, ``debounce`` consecutive frames above it) and the held-out metrics it was
exported with. The graph maps ``observation`` (B, O) float32 (the flat, non-image fields in spec
order) plus one uint8 (B, H, W, C) input per image key to ``probability`` (B,).

:class:`SuccessDetector` is what a driver loop holds (``drive reward_model=...``)::

    det = SuccessDetector.load("reward.onnx")
    det.check_spec(driver.spec.obs_fields)       # one-line ValueError at start on a mismatch
    det.reset()                                  # each episode
    d = det.update(obs)                          # each step: d.fired ends the episode, success
    det.record_verdict(operator_says_success)    # the operator overrules it either way (counted)

A frame whose input or output is not finite gives no reward: it counts as below threshold (the
run of frames above it restarts), ``nan_frames`` counts it and the first one of an episode is
logged as a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.policies.base import ObsField
from qc_robot.policies.onnx_metadata import MetadataError, is_image_field

log = logging.getLogger("qc_robot.reward")

FORMAT_NAME = "qc-robot-reward"
FORMAT_VERSION = 1
IMAGE_NORMALIZATION = "x/255"
OUTPUT = "probability"


@dataclass
class DetectorMetadata:
    """Everything the robot side needs to know about an exported success detector."""

    obs_fields: list[ObsField]
    """Observation arrays the detector reads: flat fields concatenated in this order into the
    ``observation`` input, image fields (uint8 (H, W, C)) as inputs of their own."""
    threshold: float = 0.5
    """A frame is 'above' when its probability is at least this."""
    debounce: int = 3
    """The detector fires after this many consecutive frames above ``threshold``."""
    task: str = ""
    """The task the episodes were recorded on (the file's env_args)."""
    control_hz: float = 0.0
    """Control rate of the recorded episodes (0: unknown)."""
    positive_frames: int = 0
    """Training labels: the last this many frames of a success episode were the positives."""
    gap_frames: int = 0
    """Training labels: frames just before the positives, in neither class."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Held-out metrics at export (``qc-robot reward``'s metrics JSON)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The training configuration."""
    code_version: str = ""
    torch_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    """Other metadata_props found in the file (kept, not interpreted)."""

    def __post_init__(self) -> None:
        self.obs_fields = [
            ObsField(f.key, tuple(int(s) for s in f.shape), f.dtype) if isinstance(f, ObsField)
            else ObsField(str(f["key"]), tuple(int(s) for s in f["shape"]), str(f.get("dtype", "float32")))
            for f in self.obs_fields
        ]

    @property
    def image_fields(self) -> list[ObsField]:
        return [f for f in self.obs_fields if is_image_field(f)]

    @property
    def flat_fields(self) -> list[ObsField]:
        return [f for f in self.obs_fields if not is_image_field(f)]

    @property
    def obs_dim(self) -> int:
        """Width of the flat ``observation`` input."""
        return sum(math.prod(f.shape) for f in self.flat_fields)

    def validate(self) -> None:
        """Raise :class:`MetadataError` naming the first inconsistent key."""
        if not self.obs_fields:
            raise MetadataError("obs_spec is empty")
        keys = [f.key for f in self.obs_fields]
        if len(set(keys)) != len(keys):
            raise MetadataError(f"obs_spec has duplicate keys: {keys}")
        if "observation" in {f.key for f in self.image_fields}:
            raise MetadataError("image key 'observation' is the name of the flat input")
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise MetadataError(f"threshold must be in [0, 1], got {self.threshold}")
        if int(self.debounce) < 1:
            raise MetadataError(f"debounce must be >= 1, got {self.debounce}")

    def to_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` (validated first)."""
        self.validate()
        props = dict(self.extra)
        props.update({
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "obs_spec": json.dumps([{"key": f.key, "shape": list(f.shape), "dtype": f.dtype}
                                    for f in self.obs_fields]),
            "obs_dim": str(self.obs_dim),
            "output": OUTPUT,
            "threshold": repr(float(self.threshold)),
            "debounce": str(int(self.debounce)),
            "task": self.task,
            "control_hz": repr(float(self.control_hz)),
            "positive_frames": str(int(self.positive_frames)),
            "gap_frames": str(int(self.gap_frames)),
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "config": json.dumps(self.config, sort_keys=True),
            "code_version": self.code_version,
            "torch_version": self.torch_version,
        })
        if self.image_fields:
            props["image_spec"] = json.dumps({
                "keys": [f.key for f in self.image_fields],
                "shapes": {f.key: list(f.shape) for f in self.image_fields},
                "dtype": "uint8", "layout": "NHWC", "color": "RGB", "normalization": IMAGE_NORMALIZATION,
            })
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> DetectorMetadata:
        """Parse and validate; :class:`MetadataError` names the missing or bad key."""
        if props.get("format") != FORMAT_NAME:
            found = "missing" if "format" not in props else f"is {props['format']!r}"
            hint = " (a policy file, not a detector)" if props.get("format") == "qc-robot-policy" else ""
            raise MetadataError(f"not a {FORMAT_NAME} file: metadata key 'format' {found}{hint}; "
                                "train and export one with `qc-robot reward`")
        version = _get(props, "format_version", int)
        if not 1 <= version <= FORMAT_VERSION:
            raise MetadataError(f"unsupported format_version {version} (this runtime reads "
                                f"{FORMAT_VERSION} and older); upgrade qc-robot or re-export the detector")
        known = {"format", "format_version", "obs_spec", "obs_dim", "output", "threshold", "debounce", "task",
                 "control_hz", "positive_frames", "gap_frames", "metrics", "config", "code_version",
                 "torch_version", "image_spec"}
        try:
            meta = cls(
                obs_fields=_get(props, "obs_spec", json.loads),
                threshold=_get(props, "threshold", float),
                debounce=_get(props, "debounce", int),
                task=props.get("task", ""),
                control_hz=float(props.get("control_hz", "0")),
                positive_frames=int(props.get("positive_frames", "0")),
                gap_frames=int(props.get("gap_frames", "0")),
                metrics=json.loads(props.get("metrics", "{}")),
                config=json.loads(props.get("config", "{}")),
                code_version=props.get("code_version", ""),
                torch_version=props.get("torch_version", ""),
                extra={k: v for k, v in props.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, MetadataError):
                raise
            raise MetadataError(f"malformed metadata ({type(e).__name__}: {e})") from e
        if _get(props, "obs_dim", int) != meta.obs_dim:
            raise MetadataError(f"obs_dim {props['obs_dim']} does not match obs_spec (sum = {meta.obs_dim})")
        if meta.image_fields:
            spec = _get(props, "image_spec", json.loads)
            if not isinstance(spec, dict) or spec.get("keys") != [f.key for f in meta.image_fields] \
                    or spec.get("normalization") != IMAGE_NORMALIZATION:
                raise MetadataError(f"image_spec {spec!r} does not match the obs_spec's images "
                                    f"{[f.key for f in meta.image_fields]} normalized {IMAGE_NORMALIZATION}")
        meta.validate()
        return meta


def _get(props: Mapping[str, str], key: str, parse: Any) -> Any:
    if key not in props:
        raise MetadataError(f"metadata key {key!r} missing")
    try:
        return parse(props[key])
    except (ValueError, TypeError) as e:
        raise MetadataError(f"metadata key {key!r} has a bad value {props[key]!r}: {e}") from e


def first_fire(probabilities: Sequence[float] | np.ndarray, threshold: float, debounce: int) -> int | None:
    """Index of the frame at which the debounced detector fires (None: it never does).

    It fires at the ``debounce``-th consecutive frame with probability >= ``threshold``; a
    non-finite probability breaks the run. The batch form of :meth:`SuccessDetector.update`,
    used by training metrics.
    """
    run = 0
    for i, p in enumerate(np.asarray(probabilities, np.float64).reshape(-1)):
        run = run + 1 if (math.isfinite(p) and p >= threshold) else 0
        if run >= debounce:
            return i
    return None


@dataclass(frozen=True)
class Decision:
    """The detector's output for one frame."""

    probability: float
    """P(success) of this frame; NaN when the frame was not usable."""
    above: bool
    """probability >= threshold (False for an unusable frame)."""
    streak: int
    """Consecutive frames above threshold, this one included."""
    fired: bool
    """The detector has fired in this episode (latched until :meth:`SuccessDetector.reset`)."""
    fired_at: int | None
    """Frame index (0 = the first ``update`` after ``reset``) at which it fired."""
    valid: bool = True
    """False: a non-finite input or output; the frame gave no reward and was counted."""


@dataclass(frozen=True)
class Overrule:
    """An operator's verdict that contradicted the detector on one episode."""

    episode: int
    """Episode index (counted by :meth:`SuccessDetector.reset`; the first episode is 0)."""
    detector: bool
    """The detector's decision: it fired in the episode."""
    operator: bool
    """The operator's verdict: success."""
    fired_at: int | None
    max_probability: float
    """Highest finite probability seen in the episode (NaN: none)."""

    @property
    def kind(self) -> str:
        """'false_positive' (it fired, the operator says failure) or 'false_negative'."""
        return "false_positive" if self.detector else "false_negative"


class SuccessDetector:
    """A stateful, debounced success detector over an onnxruntime session.

    ``threshold``/``debounce`` override the file's (None: as exported). ``providers``: 'cpu' or
    'auto' (CUDA when onnxruntime-gpu sees one); the network is small, CPU is the default.
    """

    def __init__(self, path: str | os.PathLike[str], threshold: float | None = None,
                 debounce: int | None = None, providers: str = "cpu", threads: int = 1) -> None:
        import onnxruntime as ort  # the cpu/gpu extra; a missing one is the CLI's one-line hint

        self.path = os.fspath(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if providers == "auto" and "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(self.path, opts, providers=chosen)
        try:
            self.meta = DetectorMetadata.from_props(dict(self.session.get_modelmeta().custom_metadata_map))
        except MetadataError as e:
            raise MetadataError(f"{self.path}: {e}") from e
        names = {i.name for i in self.session.get_inputs()}
        missing = [n for n in ["observation", *(f.key for f in self.meta.image_fields)] if n not in names]
        if missing or OUTPUT not in {o.name for o in self.session.get_outputs()}:
            raise MetadataError(f"{self.path}: the graph lacks inputs {missing} or output {OUTPUT!r} "
                                "its metadata names")
        self.threshold = float(self.meta.threshold if threshold is None else threshold)
        self.debounce = int(self.meta.debounce if debounce is None else debounce)
        if not (0.0 <= self.threshold <= 1.0) or self.debounce < 1:
            raise ValueError(f"threshold must be in [0, 1] and debounce >= 1, got {self.threshold}, {self.debounce}")
        self.nan_frames = 0
        """Frames (over all episodes) whose input or output was not finite: no reward given."""
        self.frames = 0
        self.episodes = 0
        """Episodes begun (``reset`` calls; a first ``update`` without one begins episode 0)."""
        self.fires = 0
        """Episodes in which the detector fired."""
        self.verdicts = 0
        """Operator verdicts recorded (:meth:`record_verdict`)."""
        self.overrules: list[Overrule] = []
        self._streak = 0
        self._step = 0
        self._fired_at: int | None = None
        self._max_p = float("nan")
        self._warned = False

    @classmethod
    def load(cls, path: str | os.PathLike[str], threshold: float | None = None, debounce: int | None = None,
             providers: str = "cpu", threads: int = 1) -> SuccessDetector:
        """Load an exported detector (:class:`MetadataError` for a file that is not one)."""
        return cls(path, threshold=threshold, debounce=debounce, providers=providers, threads=threads)

    def carry_counts(self, previous: SuccessDetector) -> None:
        """Go on counting where ``previous`` left off (a re-exported detector swapped in between
        episodes: the run's fires, verdicts, overrules and non-finite frames stay whole)."""
        self.frames, self.episodes, self.fires = previous.frames, previous.episodes, previous.fires
        self.verdicts, self.nan_frames = previous.verdicts, previous.nan_frames
        self.overrules = list(previous.overrules)

    # -- start of a run -----------------------------------------------------------------------
    def check_spec(self, obs_fields: Iterable[ObsField]) -> None:
        """Refuse a robot whose observations do not carry what the detector reads: ValueError
        with one line naming each missing key and each shape (or image dtype) that differs."""
        robot = {f.key: f for f in obs_fields}
        problems = []
        for f in self.meta.obs_fields:
            r = robot.get(f.key)
            if r is None:
                problems.append(f"{f.key!r} missing")
            elif tuple(r.shape) != tuple(f.shape):
                problems.append(f"{f.key!r} is {list(r.shape)}, the detector reads {list(f.shape)}")
            elif is_image_field(f) and r.dtype != "uint8":
                problems.append(f"{f.key!r} is {r.dtype}, the detector reads uint8 images")
        if problems:
            raise ValueError(f"reward model {self.path} does not match the robot's observations: "
                             f"{'; '.join(problems)} (robot keys {sorted(robot)}; detector trained on "
                             f"task {self.meta.task or '?'})")

    # -- each episode and step ----------------------------------------------------------------
    def reset(self) -> None:
        """Start an episode: forget the run of frames above threshold and the latch."""
        self.episodes += 1
        self._streak = 0
        self._step = 0
        self._fired_at = None
        self._max_p = float("nan")
        self._warned = False

    @property
    def episode(self) -> int:
        """Index of the current episode (0-based)."""
        return max(self.episodes - 1, 0)

    def probability(self, obs: Mapping[str, Any]) -> float:
        """P(success) for one observation dict (NaN when an input or the output is not finite).

        ValueError for a missing key, a wrong shape or a non-numeric dtype (a bug, not noise).
        """
        parts = [np.zeros(0, np.float32)]
        finite = True
        for f in self.meta.flat_fields:
            if f.key not in obs:
                raise ValueError(f"observation {f.key!r} missing (the detector reads "
                                 f"{[g.key for g in self.meta.obs_fields]})")
            arr = np.asarray(obs[f.key])
            if arr.shape != f.shape or arr.dtype.kind not in "biuf":
                raise ValueError(f"observation {f.key!r} is {arr.dtype} {arr.shape}, the detector reads "
                                 f"numbers of shape {f.shape}")
            arr = arr.astype(np.float32, copy=False).reshape(-1)
            finite = finite and bool(np.all(np.isfinite(arr)))
            parts.append(arr)
        images: dict[str, np.ndarray] = {}
        for f in self.meta.image_fields:
            img = np.asarray(obs[f.key]) if f.key in obs else None
            if img is None or img.dtype != np.uint8 or img.shape != f.shape:
                got = "missing" if img is None else f"{img.dtype} {img.shape}"
                raise ValueError(f"image {f.key!r} is {got}, the detector reads uint8 {f.shape}")
            images[f.key] = img[None]
        if not finite:
            return float("nan")
        return float(self.probabilities(np.concatenate(parts)[None], images)[0])

    def probabilities(self, state: np.ndarray, images: Mapping[str, np.ndarray]) -> np.ndarray:
        """P(success) of a batch, unchecked: ``state`` (B, O) the flat fields in spec order,
        ``images`` key → (B, H, W, C) uint8. NaN where the output is not finite (a row whose
        input is not finite is the caller's to mark)."""
        feed = {"observation": np.ascontiguousarray(state, np.float32),
                **{f.key: np.ascontiguousarray(images[f.key]) for f in self.meta.image_fields}}
        out = np.asarray(self.session.run([OUTPUT], feed)[0], np.float32).reshape(-1)
        return np.where(np.isfinite(out), out, np.float32(np.nan))

    def update(self, obs: Mapping[str, Any]) -> Decision:
        """Score one frame and advance the debounce; the episode's decision is ``fired``."""
        p = self.probability(obs)
        if self.episodes == 0:  # no reset() before the first frame: that is episode 0
            self.episodes = 1
        i = self._step
        self._step += 1
        self.frames += 1
        valid = math.isfinite(p)
        if not valid:
            self.nan_frames += 1
            if not self._warned:
                log.warning("reward model: non-finite input or output at frame %d of episode %d: no reward "
                            "(%d such frames so far)", i, self.episode, self.nan_frames)
                self._warned = True
        else:
            self._max_p = p if not math.isfinite(self._max_p) else max(self._max_p, p)
        above = valid and p >= self.threshold
        self._streak = self._streak + 1 if above else 0
        if self._fired_at is None and self._streak >= self.debounce:
            self._fired_at = i
            self.fires += 1
        return Decision(p, above, self._streak, self._fired_at is not None, self._fired_at, valid)

    @property
    def fired(self) -> bool:
        """The detector has fired in the current episode."""
        return self._fired_at is not None

    # -- the operator -------------------------------------------------------------------------
    def record_verdict(self, success: bool) -> Overrule | None:
        """The operator's verdict on the current episode: returns (and logs and keeps) an
        :class:`Overrule` when it contradicts the detector, None when it agrees."""
        self.verdicts += 1
        if bool(success) == self.fired:
            return None
        o = Overrule(self.episode, self.fired, bool(success), self._fired_at, self._max_p)
        self.overrules.append(o)
        log.warning("reward model overruled on episode %d: detector %s, operator %s (%s; max p %.3f)",
                    o.episode, "success" if o.detector else "no success",
                    "success" if o.operator else "failure", o.kind, o.max_probability)
        return o

    def summary(self) -> dict[str, Any]:
        """Counts for a run's summary line and logs."""
        fp = sum(o.kind == "false_positive" for o in self.overrules)
        return {"episodes": self.episodes, "frames": self.frames, "fires": self.fires,
                "verdicts": self.verdicts, "overrules": len(self.overrules),
                "overrules_false_positive": fp, "overrules_false_negative": len(self.overrules) - fp,
                "nan_frames": self.nan_frames, "threshold": self.threshold, "debounce": self.debounce}
