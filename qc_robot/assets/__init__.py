"""Files shipped inside the package: the small trained policy ``qc-robot serve`` serves by default.

``cube-single-task1.onnx`` is a QC-FQL policy for OGBench's cube-single task 1, trained with the
project's own CLI (the command and its success rate are in docs/results.md). It is a regular
exported policy file: ``qc-robot serve`` (no ``--policy``), ``qc-robot drive driver=sim`` and
``qc-robot demo`` use it right after install, with no training first.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TASK = "cube-single-task1"
"""The task the shipped policy was trained on (``drive``/``demo`` default to it)."""


def default_policy_path() -> Path:
    """The shipped ONNX policy file (inside the installed package)."""
    return Path(__file__).resolve().parent / f"{DEFAULT_TASK}.onnx"
