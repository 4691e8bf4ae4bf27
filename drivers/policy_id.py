"""Which policy a server serves, in words, and whether it is the one a run expects.

A server the user believes they started may be another one left running on the same port (a
backgrounded ``qc-robot serve`` whose bind failed, a previous session's): the run would then
report *that* policy's results as the user's own. ``drive``/``demo`` print :func:`policy_label`
on their connected and summary lines, and ``drive policy_expect=FILE`` refuses a server whose
``welcome.metadata`` does not describe FILE (:func:`mismatch`).

The welcome carries no file name (docs/protocol.md ``welcome.metadata``): a policy is known by
what its file's metadata holds, its training config's hash and step, actor type, chunk length,
action size and task. Two exports of one checkpoint are the same policy by this measure.
Standard library only: a robot PC needs neither onnx nor onnxruntime for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IDENTITY_KEYS = ("source", "config_hash", "train_step", "actor_type", "chunk_len", "action_dim", "task")
"""The welcome.metadata keys that must agree for a server to serve the expected policy."""


def _obs_dim(obs: Any) -> int:
    """Flat size of a wire obs spec (a list of {key, shape, dtype})."""
    return sum(_prod(f.get("shape", [])) for f in obs if isinstance(f, dict)) if isinstance(obs, list) else 0


def expected_identity(ref: str) -> dict[str, str]:
    """The identity of ``ref`` ('default', a model.onnx, or hold:/random: bring-up), as strings.

    Raises ValueError for a file that is not a qc-robot policy or a malformed bring-up ref,
    OSError for a file that cannot be read."""
    from qc_robot.policies.scripted import scripted_from_ref

    scripted = scripted_from_ref(ref) if ref not in ("", "default") else None
    if scripted is not None:
        s = scripted.spec
        return {"source": "scripted", "actor_type": s.actor_type, "chunk_len": str(s.chunk_len),
                "action_dim": str(s.action_dim), "obs_dim": str(sum(int(_prod(f.shape)) for f in s.obs_fields))}
    from qc_robot.policies.onnx_props import read_props

    props = read_props(_policy_path(ref))
    if props.get("format") != "qc-robot-policy":
        raise ValueError(f"{ref} is not a policy exported by qc-robot (no qc-robot-policy metadata)")
    ident = {k: props[k] for k in IDENTITY_KEYS if k in props}
    ident["source"] = "onnx"
    ident.setdefault("task", "")
    return ident


def served_identity(metadata: dict[str, Any]) -> dict[str, str]:
    """The same keys from a server's ``welcome.metadata`` (values as strings)."""
    ident = {k: str(metadata[k]) for k in IDENTITY_KEYS if k in metadata}
    if metadata.get("source") == "scripted":
        ident = {k: ident[k] for k in ("source", "actor_type", "chunk_len", "action_dim") if k in ident}
        ident["obs_dim"] = str(_obs_dim(metadata.get("obs")))
    return ident


def mismatch(ref: str, metadata: dict[str, Any]) -> str | None:
    """None when the server's policy is ``ref``; else one line saying what differs."""
    want, got = expected_identity(ref), served_identity(metadata)
    differ = [k for k in want if want[k] != got.get(k, "")]
    if not differ:
        return None
    detail = ", ".join(f"{k} {got.get(k, '') or '-'} (expected {want[k] or '-'})" for k in differ)
    return f"the server serves {policy_label(metadata)}, not {ref}: {detail}"


def policy_label(metadata: dict[str, Any], expected: str = "") -> str:
    """'the shipped policy (fql, task cube-single-task1, version step20000-5a0ee3a8)' and the like.

    ``expected``: a ref already checked against this server (its file name is then shown)."""
    version = metadata.get("policy_version", "?")
    actor = metadata.get("actor_type", "?")
    if metadata.get("source") == "scripted":
        dims = f"{_obs_dim(metadata.get('obs'))}:{metadata.get('action_dim', '?')}:{metadata.get('chunk_len', '?')}"
        return f"bring-up {actor} policy {dims} (no model, version {version})"
    name = Path(expected).name if expected not in ("", "default") else ""
    if not name:
        name = "the shipped policy" if _is_shipped(metadata) else "a model"
    task = metadata.get("task") or "unnamed"
    config = str(metadata.get("config_hash", ""))[:8] or "-"
    trained = "" if config in str(version) else f", step {metadata.get('train_step', '?')}, config {config}"
    return f"{name} ({actor}, task {task}, version {version}{trained})"


def _is_shipped(metadata: dict[str, Any]) -> bool:
    try:
        shipped = expected_identity("default")
    except (OSError, ValueError):  # an install without the asset
        return False
    return all(shipped.get(k) == str(metadata.get(k, "")) for k in ("config_hash", "train_step", "actor_type"))


def _policy_path(ref: str) -> Path:
    if ref in ("", "default"):
        from qc_robot.assets import default_policy_path

        return default_policy_path()
    return Path(ref)


def _prod(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
