"""What the server tells drivers about the policy it serves (``welcome.metadata``, ``description``).

One plain map, built from the policy's spec and, for an exported model, its ONNX metadata, so a
driver written from docs/protocol.md alone can configure itself: task, observation fields with
shapes and dtypes, action dimension and limits, chunk length, control rate, version.
"""

from __future__ import annotations

from typing import Any

from qc_robot import protocol as P
from qc_robot.policies.base import Policy

_ONNX_KEYS = ("num_samples", "flow_steps", "q_agg", "train_step", "config_hash", "code_version", "format_version")


def policy_metadata(policy: Policy, version: str | None = None) -> dict[str, Any]:
    """The served policy described in msgpack-native values (lists, not arrays).

    Keys (docs/protocol.md section 4, ``welcome``): ``protocol_version``, ``task`` ('' when the
    file does not name one), ``obs`` (spec list), ``action_dim``, ``action_low``/``action_high``
    (lists of A floats), ``chunk_len``, ``control_hz``, ``policy_version``, ``actor_type``,
    ``source`` ('onnx' or 'scripted') and, for ONNX files, the exporter's fields (``train_step``,
    ``config_hash``, ...)."""
    spec = policy.spec
    meta: dict[str, Any] = {
        "protocol_version": P.PROTOCOL_VERSION,
        "task": "",
        "obs": P.obs_spec_to_wire(spec.obs_fields),
        "action_dim": int(spec.action_dim),
        "action_low": [float(x) for x in spec.action_low],
        "action_high": [float(x) for x in spec.action_high],
        "chunk_len": int(spec.chunk_len),
        "control_hz": float(spec.control_hz),
        "policy_version": str(spec.version if version is None else version),
        "actor_type": str(spec.actor_type),
        "source": "scripted",
    }
    onnx_meta = getattr(policy, "meta", None)  # qc_robot.policies.onnx_policy.OnnxPolicy
    if onnx_meta is not None:
        meta["source"] = "onnx"
        for k in _ONNX_KEYS:
            v = getattr(onnx_meta, k, None)
            if isinstance(v, str | int | float) and not isinstance(v, bool):
                meta[k] = v
        extra = getattr(onnx_meta, "extra", {}) or {}
        meta["task"] = str(extra.get("task", extra.get("env", "")))
    return meta
