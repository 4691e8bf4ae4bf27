"""The metadata schema of an exported policy file (ONNX ``metadata_props``), torch-free.

The exporter writes it and the runtime reads it, both through :class:`PolicyMetadata`, so the
two cannot drift apart. Every value is a string (ONNX stores strings only); structured values
are JSON. A file is recognised by ``format == FORMAT_NAME``; ``format_version`` is bumped on
any change a reader of the previous version would misread. Keys added without a bump are
optional and have defaults (``rtc``, ``rtc_max_guidance``): a file written before them reads as
before, and an older reader keeps them in ``extra`` and serves the plain ``actions`` output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.policies.base import ObsField, PolicySpec

FORMAT_NAME = "qc-robot-policy"
FORMAT_VERSION = 1
ACTOR_TYPES = ("best_of_n", "fql")


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
    train_step: int = 0
    config_hash: str = ""
    code_version: str = ""
    torch_version: str = ""
    format_version: int = FORMAT_VERSION
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
    def obs_dim(self) -> int:
        return sum(math.prod(f.shape) for f in self.obs_fields)

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
        if self.format_version != FORMAT_VERSION:
            raise MetadataError(
                f"unsupported format_version {self.format_version} (this code reads {FORMAT_VERSION})"
            )
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
                "format_version": str(self.format_version),
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
        if version != FORMAT_VERSION:
            raise MetadataError(
                f"unsupported format_version {version} (this runtime reads {FORMAT_VERSION}); "
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
            version=version
            if version is not None
            else f"step{self.train_step}-{self.config_hash[:8]}",
        )


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
