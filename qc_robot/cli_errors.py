"""User mistakes as one line: what went wrong, naming the key, file or extra to install.

The CLI runs every verb inside :func:`explain`: a mistake (a missing file, a package a verb
needs but the install lacks, an unknown task, a bad value) becomes ``qc-robot VERB: ...`` on
stderr and a non-zero exit code instead of a traceback. ``QC_ROBOT_TRACEBACK=1`` shows the
traceback as well, for bug reports.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

# Top-level module → the extra of ``pyproject.toml`` that installs it.
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "learn", "onnx": "learn", "onnxscript": "learn", "matplotlib": "learn",
    "mujoco": "sim", "ogbench": "sim", "gymnasium": "sim", "scipy": "sim",
    "onnxruntime": "cpu", "evdev": "teleop", "pyspacemouse": "teleop",
    "imageio": "video", "imageio_ffmpeg": "video", "PIL": "learn", "rerun": "viz",
    "pyarrow": "lerobot-data", "av": "lerobot-data", "ray": "cluster",
}

EXIT_USAGE = 2
"""Bad configuration, unknown verb or key, missing required key."""
EXIT_FAILED = 1
"""The verb could not do its job (a missing file, a missing extra, a bad value)."""


class UserError(Exception):
    """A mistake the user can fix, already phrased as the one line to show."""


LEARN_VERBS = ("train", "eval", "export", "finetune")
"""Verbs that need torch as well as the sim: one hint for the extra that covers both ([learn]
includes [sim]), not [sim] first and then [learn]."""


def missing_extra_message(exc: ModuleNotFoundError, verb: str = "") -> str:
    """'needs torch, which this install lacks: pip install "qc-robot[learn]"'."""
    top = (exc.name or str(exc)).split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra == "sim" and verb in LEARN_VERBS:
        extra = "learn"
    if extra is None:
        return f"needs the Python module {top!r}, which is not installed ({exc})"
    return f"needs {top}, which this install lacks: pip install \"qc-robot[{extra}]\""


def describe(exc: BaseException, verb: str = "") -> str:
    """One line for ``exc``, without the exception's own multi-line decorations."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError):
        return missing_extra_message(exc, verb)
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or ""
        return f"file not found: {name}" if name and str(name) not in str(exc) else str(exc)
    if type(exc).__name__ == "UnpicklingError" or isinstance(exc, EOFError):  # torch.load of a non-checkpoint
        return f"not a checkpoint written by qc-robot train (cannot unpickle it: {' '.join(str(exc).split())})"
    module = type(exc).__module__ or ""
    if module.startswith("onnxruntime"):  # NoSuchFile, InvalidProtobuf, Fail: not an ONNX model
        text = str(exc).split(" : ")[-1]
        return f"onnxruntime cannot load the model: {text}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, KeyError, OSError, RuntimeError, TypeError)):
        return text
    return f"{type(exc).__name__}: {text}"


def config_error_text(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error: the override and why it was refused."""
    options = getattr(exc, "options", None)
    missing = getattr(exc, "missing_cfg_file", None)
    if missing and options is not None and "/" in str(missing):
        from qc_robot.cli_text import shown_options

        group, _, name = str(missing).rpartition("/")
        return f"no {group} named {name!r} ({group}={name}); options: {shown_options(list(options))}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        cause_text = str(cause).strip().splitlines()[0]
        if type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
            return f"unknown key: {cause_text}"
        return f"{first}: {cause_text}"
    return " ".join(first.split())


def explain(verb: str, fn: Callable[[], Any], subject: str = "") -> int:
    """Run ``fn`` (the verb); any exception becomes one line on stderr and a non-zero code.

    ``subject`` (e.g. ``checkpoint=runs/x.pt``) names the input a content error is about."""
    try:
        result = fn()
    except KeyboardInterrupt:
        print(f"qc-robot {verb}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 (the one place a whole verb's failure is reported)
        if os.environ.get("QC_ROBOT_TRACEBACK"):
            traceback.print_exc()
        text = describe(e, verb)
        if subject and not isinstance(e, (UserError, ModuleNotFoundError)) and subject.split("=", 1)[-1] not in text:
            text = f"{subject}: {text}"
        print(f"qc-robot {verb}: {text}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UserError) else EXIT_FAILED
    return int(result) if isinstance(result, int) else 0
