"""The metadata schema of an exported policy file (ONNX ``metadata_props``), torch-free.

The exporter writes it and the runtime reads it, both through :class:`PolicyMetadata`, so the
two cannot drift apart. Every value is a string (ONNX stores strings only); structured values
are JSON. A file is recognised by ``format == FORMAT_NAME``; ``format_version`` is bumped on
any change a reader of the previous version would misread. Keys added without a bump are
optional and have defaults (``rtc``, ``rtc_max_guidance``): a file written before them reads as
before, and an older reader keeps them in ``extra`` and serves the plain ``actions`` output.

Image policies (issue 12) are format_version 2: a field of dtype uint8 and shape (H, W, C) is an
image, fed as its own uint8 NHWC graph input named by its key (the graph divides by 255), and
``image_spec`` says so (keys, shapes, layout, normalization, frame stacking). The flat float32
``observation`` input holds the other fields, and ``obs_dim`` counts only those. A file without
images is still written as version 1, byte for byte as before, so older runtimes keep reading
state-only files; they refuse image files by version instead of misreading them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.policies.base import ObsField, PolicySpec

FORMAT_NAME = "qc-robot-policy"
FORMAT_VERSION = 2
"""The newest version this code reads (it reads 1 too); files without images are written as 1."""
IMAGE_VERSION = 2
ACTOR_TYPES = ("best_of_n", "fql")
GRAPH_INPUTS = ("observation", "noise", "prev_actions", "prev_delay", "prev_len")
"""Input names the graph uses itself: no image key may take one."""
IMAGE_NORMALIZATION = "x/255"


def is_image_field(f: ObsField) -> bool:
    """uint8 (H, W, C): an image, fed to the graph as bytes under its own key."""
    return f.dtype == "uint8" and len(f.shape) == 3


class MetadataError(ValueError):
    """The file's metadata is missing, of an unknown format version, or inconsistent."""


@dataclass
class PolicyMetadata:
    """Everything a robot-side runtime needs to know about an exported policy."""

    obs_fields: list[ObsField]
    """Observation arrays in the order they are concatenated into the model's input."""
    action_dim: int
    chunk_len: int
    """Actions per chunk (H)."""
    control_hz: float
    action_low: np.ndarray
    """(A,) robot-unit limits; the graph maps [-1, 1] onto [low, high] and clips."""
    action_high: np.ndarray
    actor_type: str
    """'best_of_n' (QC) or 'fql' (QC-FQL one-step actor)."""
    num_samples: int = 1
    """N for best-of-N (1 for fql)."""
    flow_steps: int = 10
    q_agg: str = "mean"
    noise_input: bool = True
    """The file accepts an optional ``noise`` input (otherwise noise is always drawn inside)."""
    rtc: bool = False
    """The graph also has the real-time-chunking output ``actions_rtc`` and its inputs
    ``prev_actions``, ``prev_delay``, ``prev_len`` (absent in files exported before RTC)."""
    rtc_max_guidance: float = 5.0
    """β, the bound on the RTC guidance weight the graph was built with."""
    frame_stack: int = 1
    """Frames stacked along channels in each image input (C = 3·frame_stack; images only)."""
    train_step: int = 0
    config_hash: str = ""
    code_version: str = ""
    torch_version: str = ""
    format_version: int = 1
    """As read from a file; :meth:`to_props` writes the lowest version that describes it."""
    extra: dict[str, str] = field(default_factory=dict)
    """Other metadata_props found in the file (kept, not interpreted)."""

    def __post_init__(self) -> None:
        self.obs_fields = [
            f
            if isinstance(f, ObsField)
            else ObsField(f["key"], tuple(f["shape"]), f.get("dtype", "float32"))
            for f in self.obs_fields
        ]
        self.obs_fields = [
            ObsField(f.key, tuple(int(s) for s in f.shape), f.dtype) for f in self.obs_fields
        ]
        self.action_low = np.asarray(self.action_low, np.float32).reshape(-1)
        self.action_high = np.asarray(self.action_high, np.float32).reshape(-1)

    @property
    def image_fields(self) -> list[ObsField]:
        """The image inputs, in graph-input order."""
        return [f for f in self.obs_fields if is_image_field(f)]

    @property
    def flat_fields(self) -> list[ObsField]:
        """The fields concatenated (as float32) into the ``observation`` input, in order."""
        return [f for f in self.obs_fields if not is_image_field(f)]

    @property
    def obs_dim(self) -> int:
        """Width of the flat ``observation`` input (image fields are inputs of their own)."""
        return sum(math.prod(f.shape) for f in self.flat_fields)

    @property
    def written_version(self) -> int:
        return IMAGE_VERSION if self.image_fields else 1

    @property
    def flat_dim(self) -> int:
        """D = H·A, the flattened chunk the noise lives in."""
        return self.chunk_len * self.action_dim

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Noise per observation: (N, D) for best-of-N, (D,) for the one-step actor."""
        if self.actor_type == "best_of_n":
            return (self.num_samples, self.flat_dim)
        return (self.flat_dim,)

    def validate(self) -> None:
        """Raise :class:`MetadataError` naming the first inconsistent key."""
        if not 1 <= self.format_version <= FORMAT_VERSION:
            raise MetadataError(
                f"unsupported format_version {self.format_version} (this code reads {FORMAT_VERSION} and older)"
            )
        for f in self.image_fields:
            if f.key in GRAPH_INPUTS:
                raise MetadataError(f"image key {f.key!r} is a name the graph uses for another input")
            if min(f.shape) < 1:
                raise MetadataError(f"image {f.key!r} has an empty shape {list(f.shape)}")
        if int(self.frame_stack) < 1:
            raise MetadataError(f"frame_stack must be >= 1, got {self.frame_stack}")
        if self.actor_type not in ACTOR_TYPES:
            raise MetadataError(f"actor_type must be one of {ACTOR_TYPES}, got {self.actor_type!r}")
        if not self.obs_fields:
            raise MetadataError("obs_spec is empty")
        keys = [f.key for f in self.obs_fields]
        if len(set(keys)) != len(keys):
            raise MetadataError(f"obs_spec has duplicate keys: {keys}")
        for name in ("action_dim", "chunk_len", "num_samples", "flow_steps"):
            if int(getattr(self, name)) < 1:
                raise MetadataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.control_hz > 0:
            raise MetadataError(f"control_hz must be > 0, got {self.control_hz}")
        if not (isinstance(self.rtc, bool) and math.isfinite(self.rtc_max_guidance) and self.rtc_max_guidance >= 0):
            raise MetadataError(f"rtc must be a bool and rtc_max_guidance >= 0, got {self.rtc!r}, "
                                f"{self.rtc_max_guidance!r}")
        if self.q_agg not in ("mean", "min"):
            raise MetadataError(f"q_agg must be 'mean' or 'min', got {self.q_agg!r}")
        for name in ("action_low", "action_high"):
            arr = getattr(self, name)
            if arr.shape != (self.action_dim,) or not np.all(np.isfinite(arr)):
                raise MetadataError(
                    f"{name} must be {self.action_dim} finite numbers, got {arr.tolist()}"
                )
        if np.any(self.action_low > self.action_high):
            raise MetadataError("action_low must be <= action_high everywhere")

    def to_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` as a str → str dict (validated first)."""
        self.validate()
        props = dict(self.extra)
        props.update(
            {
                "format": FORMAT_NAME,
                "format_version": str(self.written_version),
                "obs_spec": json.dumps(
                    [
                        {"key": f.key, "shape": list(f.shape), "dtype": f.dtype}
                        for f in self.obs_fields
                    ]
                ),
                "obs_dim": str(self.obs_dim),
                "action_dim": str(self.action_dim),
                "chunk_len": str(self.chunk_len),
                "control_hz": repr(float(self.control_hz)),
                "action_low": json.dumps([float(v) for v in self.action_low]),
                "action_high": json.dumps([float(v) for v in self.action_high]),
                "actor_type": self.actor_type,
                "num_samples": str(self.num_samples),
                "flow_steps": str(self.flow_steps),
                "q_agg": self.q_agg,
                "noise_input": json.dumps(bool(self.noise_input)),
                "rtc": json.dumps(bool(self.rtc)),
                "rtc_max_guidance": repr(float(self.rtc_max_guidance)),
                "train_step": str(self.train_step),
                "config_hash": self.config_hash,
                "code_version": self.code_version,
                "torch_version": self.torch_version,
            }
        )
        if self.image_fields:
            props["image_spec"] = json.dumps({
                "keys": [f.key for f in self.image_fields],
                "shapes": {f.key: list(f.shape) for f in self.image_fields},
                "dtype": "uint8", "layout": "NHWC", "color": "RGB",
                "normalization": IMAGE_NORMALIZATION, "frame_stack": int(self.frame_stack),
            })
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> PolicyMetadata:
        """Parse and validate; raises :class:`MetadataError` naming the missing/bad key."""
        if props.get("format") != FORMAT_NAME:
            found = "missing" if "format" not in props else f"is {props['format']!r}"
            raise MetadataError(
                f"not a {FORMAT_NAME} file: metadata key 'format' {found} (export it with `qc-robot export`)"
            )
        version = _get(props, "format_version", int)
        if not 1 <= version <= FORMAT_VERSION:
            raise MetadataError(
                f"unsupported format_version {version} (this runtime reads {FORMAT_VERSION} and older); "
                "upgrade qc-robot or re-export the policy"
            )
        try:
            meta = cls(**_parse_fields(props), format_version=version)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, MetadataError):
                raise
            raise MetadataError(f"malformed metadata ({type(e).__name__}: {e})") from e
        meta.extra = {k: v for k, v in props.items() if k not in meta.to_props()}
        if _get(props, "obs_dim", int) != meta.obs_dim:
            raise MetadataError(
                f"obs_dim {props['obs_dim']} does not match obs_spec (sum = {meta.obs_dim})"
            )
        if bool(meta.image_fields) != (version >= IMAGE_VERSION):
            raise MetadataError(f"format_version {version} but the obs_spec has "
                                f"{'image' if meta.image_fields else 'no image'} fields")
        if meta.image_fields:
            spec = _get(props, "image_spec", json.loads)
            if not isinstance(spec, dict) or spec.get("keys") != [f.key for f in meta.image_fields]:
                raise MetadataError(f"image_spec keys {spec.get('keys') if isinstance(spec, dict) else spec!r} "
                                    f"do not match the obs_spec's images {[f.key for f in meta.image_fields]}")
            if spec.get("normalization") != IMAGE_NORMALIZATION or spec.get("dtype") != "uint8":
                raise MetadataError(f"image_spec: this runtime feeds uint8 images normalized "
                                    f"{IMAGE_NORMALIZATION} in the graph, the file says {spec}")
            meta.frame_stack = int(spec.get("frame_stack", 1))
        meta.validate()
        return meta

    def to_spec(self, version: str | None = None) -> PolicySpec:
        """The :class:`PolicySpec` the control server announces for this policy."""
        return PolicySpec(
            obs_fields=list(self.obs_fields),
            action_dim=self.action_dim,
            chunk_len=self.chunk_len,
            control_hz=self.control_hz,
            action_low=self.action_low.copy(),
            action_high=self.action_high.copy(),
            actor_type=self.actor_type,
            version=version if version is not None else policy_version(self.train_step, self.config_hash),
        )


def policy_version(train_step: int, config_hash: str) -> str:
    """The version a policy is announced and logged under: 'step20000-5a0ee3a8' (its training step
    and config hash, so a checkpoint and the files exported from it share it)."""
    return f"step{train_step}-{config_hash[:8]}"


def _get(props: dict[str, str], key: str, parse: Any) -> Any:
    if key not in props:
        raise MetadataError(f"metadata key {key!r} missing")
    try:
        return parse(props[key])
    except (ValueError, TypeError) as e:
        raise MetadataError(f"metadata key {key!r} has a bad value {props[key]!r}: {e}") from e


def _parse_fields(props: dict[str, str]) -> dict[str, Any]:
    return {
        "obs_fields": _get(props, "obs_spec", json.loads),
        "action_dim": _get(props, "action_dim", int),
        "chunk_len": _get(props, "chunk_len", int),
        "control_hz": _get(props, "control_hz", float),
        "action_low": _get(props, "action_low", json.loads),
        "action_high": _get(props, "action_high", json.loads),
        "actor_type": _get(props, "actor_type", str),
        "num_samples": _get(props, "num_samples", int),
        "flow_steps": _get(props, "flow_steps", int),
        "q_agg": _get(props, "q_agg", str),
        "noise_input": _get(props, "noise_input", json.loads),
        "train_step": _get(props, "train_step", int),
        "config_hash": _get(props, "config_hash", str),
        "code_version": _get(props, "code_version", str),
        "torch_version": _get(props, "torch_version", str),
        # optional keys, added after format_version 1 shipped: older files lack them
        "rtc": _get(props, "rtc", json.loads) if "rtc" in props else False,
        "rtc_max_guidance": _get(props, "rtc_max_guidance", float) if "rtc_max_guidance" in props else 5.0,
    }
