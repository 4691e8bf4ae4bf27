"""Per-robot calibration files: one versioned JSON file per robot, ``calibration/<robot_id>.json``.

The sim driver, the drive runner (chunk executor) and training read it; every episode logged
with it records its :attr:`Calibration.id` (robot id + content hash), so a mismatch between the
calibration a policy was trained with and the one the robot runs is visible in the data instead
of at deployment. Loading validates everything and raises :class:`CalibrationError` naming the
file and the field. numpy and the standard library only: robot PCs load this too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qc_robot.calibration.randomization import PARAM_KINDS, check_params

FORMAT = "qc-robot-calibration"
VERSION = 1
CALIBRATION_DIR = Path(__file__).resolve().parent
SECTIONS = ("latency", "normalization", "physics")
MAX_CONTROL_HZ = 1000.0
"""Fastest control rate a file may name (arm controllers run at 125 Hz to 1 kHz; the sim at 20)."""
MAX_DELAY_S = 2.0
"""Longest delay (control or inference, in seconds at ``control_hz``) a file may hold: a robot
that takes longer to act on a command is not one a chunked policy can drive."""
MAX_LATENCY_MS = 10_000.0
"""Largest round trip or actuation latency a file may hold (ms)."""
MAX_REPLAY_ERROR = 10.0
"""Largest normalised replay error a fit report may hold. The error is an RMS of residuals each
divided by its dim's spread in the log: the stock model scores 0.02-0.8 on the matrix's robots,
and a value above 10 (or 1e30) says the file was edited, not fitted, and would let ``check``
pass any drift."""
REPLAY_MODES = ("lockstep", "executed", "ctrl")


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, from another version or for another robot/task."""


@dataclass
class Calibration:
    """What one robot's calibration holds; sections are None until measured."""

    robot_id: str
    task: str = ""
    """Sim task the sections were measured for (obs layout and sim model); '' = any."""
    control_hz: float = 20.0
    latency: dict[str, Any] | None = None
    """``qc_robot.calibration.latency.measure_latency`` output: rtt_ms / actuation_ms stats (p50, p90, p99,
    mean, max, n), ``inference_delay_steps``, ``actuation_delay_steps``, ``obs_noise_std``."""
    normalization: dict[str, Any] | None = None
    """``qc_robot.calibration.normalization.dataset_stats`` output: per obs key and for actions, mean, std,
    min, max, percentiles; ``action_limits``; the dataset it came from."""
    physics: dict[str, Any] | None = None
    """``params`` (kind → value, see ``qc_robot.calibration.randomization``), ``ranges`` (kind → [lo, hi]),
    ``control_delay_steps``, ``sigma`` and the fit report."""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    notes: str = ""

    def content(self) -> dict[str, Any]:
        """The hashed part: everything that changes behaviour (not the timestamp or notes)."""
        return {"robot_id": self.robot_id, "task": self.task, "control_hz": self.control_hz,
                "latency": self.latency, "normalization": self.normalization, "physics": self.physics}

    @property
    def id(self) -> str:
        """``<robot_id>@<12 hex of sha256 of the content>``: recorded with every episode."""
        blob = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return f"{self.robot_id}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.content(), "created": self.created,
                "notes": self.notes, "id": self.id}

    # -- what the consumers read ---------------------------------------------------------------

    @property
    def inference_delay_steps(self) -> int:
        """Initial delay estimate for the latency-aware executor (0 without a latency section)."""
        return int((self.latency or {}).get("inference_delay_steps", 0))

    @property
    def control_delay_steps(self) -> int:
        """Actuation delay for the sim: the fitted one if physics is identified, else the measured one."""
        if self.physics is not None:
            return int(self.physics.get("control_delay_steps", 0))
        return int((self.latency or {}).get("actuation_delay_steps", 0))

    @property
    def obs_noise(self) -> float:
        return float((self.latency or {}).get("obs_noise_std", 0.0))


def default_path(robot_id: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """``calibration/<robot_id>.json`` (the package directory unless ``directory`` is given)."""
    if not robot_id or any(c in robot_id for c in "/\\") or robot_id.startswith("."):
        raise CalibrationError(f"robot_id {robot_id!r} is not a valid file name")
    return Path(directory or CALIBRATION_DIR) / f"{robot_id}.json"


def save_calibration(cal: Calibration, path: str | os.PathLike[str] | None = None) -> Path:
    """Validate and write atomically (a crash never leaves half a file); returns the path."""
    data = cal.to_json()
    validate(data, "calibration")  # never write what we would refuse to read
    p = Path(path) if path else default_path(cal.robot_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p


def load_calibration(path: str | os.PathLike[str], robot_id: str | None = None,
                     task: str | None = None) -> Calibration:
    """Read and validate ``path``; ``robot_id``/``task`` (when given) must match the file's."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: calibration file not found (run `qc-robot calibrate robot_id=...`)")
    try:
        data = json.loads(p.read_text(), parse_constant=lambda c: float(c))
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{p}: not valid JSON ({e})") from None
    validate(data, str(p))
    cal = Calibration(robot_id=data["robot_id"], task=data.get("task", ""), control_hz=float(data["control_hz"]),
                      latency=data.get("latency"), normalization=data.get("normalization"),
                      physics=data.get("physics"), created=str(data.get("created", "")),
                      notes=str(data.get("notes", "")))
    if robot_id is not None and cal.robot_id != robot_id:
        raise CalibrationError(f"{p}: calibration is for robot {cal.robot_id!r}, not {robot_id!r}")
    if task and cal.task and cal.task != task:
        raise CalibrationError(f"{p}: calibration was measured on task {cal.task!r}, this run uses {task!r}")
    return cal


def validate(data: Any, where: str) -> None:
    """Raise CalibrationError on the first problem in a decoded calibration file."""
    def fail(msg: str) -> None:
        raise CalibrationError(f"{where}: {msg}")

    if not isinstance(data, dict):
        fail("top level must be a JSON object")
    if data.get("format") != FORMAT:
        fail(f"'format' is {data.get('format')!r}, expected {FORMAT!r} (not a calibration file)")
    version = data.get("version")
    if not isinstance(version, int) or version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        fail(f"'version' is {version!r}, this qc-robot reads version {VERSION}"
             + (" (written by a newer qc-robot: upgrade)" if newer else " (re-run calibrate)"))
    for key, typ in (("robot_id", str), ("control_hz", (int, float))):
        if key not in data:
            fail(f"missing field {key!r}")
        if not isinstance(data[key], typ) or isinstance(data[key], bool):
            fail(f"{key!r} has the wrong type ({type(data[key]).__name__})")
    if not data["robot_id"]:
        fail("'robot_id' is empty")
    bad = _first_non_finite(data, "")
    if bad is not None:
        fail(f"{bad} is NaN or infinite")
    if not 0 < data["control_hz"] <= MAX_CONTROL_HZ:
        fail(f"'control_hz' is {data['control_hz']!r}, must be in (0, {MAX_CONTROL_HZ:g}] Hz")
    for key in ("task", "created", "notes", "id"):
        if key in data and not isinstance(data[key], str):
            fail(f"{key!r} must be a string, got {type(data[key]).__name__}")
    for s in SECTIONS:
        if data.get(s) is not None and not isinstance(data[s], dict):
            fail(f"section {s!r} must be an object or null")
    hz = float(data["control_hz"])
    for s, check in (("latency", _check_latency), ("normalization", _check_normalization),
                     ("physics", _check_physics)):
        if data.get(s) is not None:
            try:
                check(data[s], fail, hz)
            except (TypeError, KeyError, AttributeError, IndexError) as e:  # a shape the checks did not foresee
                fail(f"section {s!r} is malformed ({type(e).__name__}: {e})")


def _first_non_finite(x: Any, path: str) -> str | None:
    if isinstance(x, float) and not math.isfinite(x):
        return path or "value"
    if isinstance(x, dict):
        for k, v in x.items():
            if (r := _first_non_finite(v, f"{path}.{k}" if path else str(k))) is not None:
                return r
    if isinstance(x, list):
        for i, v in enumerate(x):
            if (r := _first_non_finite(v, f"{path}[{i}]")) is not None:
                return r
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need(sec: dict[str, Any], name: str, keys: tuple[str, ...], fail: Any) -> None:
    for k in keys:
        if k not in sec:
            fail(f"section {name!r} is missing field {k!r}")


def _number(x: Any, name: str, fail: Any, lo: float | None = None, hi: float | None = None) -> float:
    """``x`` as a float, refusing a non-number (``true``, ``"small"``) or a value outside [lo, hi]."""
    if not _is_number(x):
        fail(f"{name} must be a number, got {x!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        fail(f"{name} = {x!r} is outside [{'-inf' if lo is None else f'{lo:g}'}, "
             f"{'inf' if hi is None else f'{hi:g}'}]")
    return float(x)


def _numbers(x: Any, name: str, fail: Any, n: int | None = None) -> list[float]:
    """A list of numbers (of length ``n`` when given)."""
    if not isinstance(x, list) or not all(_is_number(v) for v in x):
        fail(f"{name} must be a list of numbers")
    if n is not None and len(x) != n:
        fail(f"{name} has {len(x)} entries, expected {n}")
    return [float(v) for v in x]


def _delay_steps(x: Any, name: str, fail: Any, hz: float) -> None:
    """A whole number of control steps, at most MAX_DELAY_S at ``hz``."""
    most = int(MAX_DELAY_S * hz)
    if not _is_int(x) or not 0 <= x <= most:
        fail(f"{name} must be an integer in [0, {most}] steps ({MAX_DELAY_S:g} s at {hz:g} Hz), got {x!r}")


def _check_latency(sec: dict[str, Any], fail: Any, hz: float) -> None:
    _need(sec, "latency", ("rtt_ms", "actuation_ms", "inference_delay_steps", "actuation_delay_steps"), fail)
    for k in ("inference_delay_steps", "actuation_delay_steps"):
        _delay_steps(sec[k], f"latency.{k}", fail, hz)
    period_ms = 1e3 / hz
    for k in ("rtt_ms", "actuation_ms"):
        st = sec[k]
        if not isinstance(st, dict) or not {"p50", "p90", "p99"} <= set(st):
            fail(f"latency.{k} must hold p50, p90 and p99")
        if not all(_is_number(st[p]) for p in ("p50", "p90", "p99")):
            fail(f"latency.{k} percentiles must be numbers")
        if not st["p50"] <= st["p90"] <= st["p99"]:
            fail(f"latency.{k} percentiles are not increasing (p50 <= p90 <= p99)")
        # a round trip is never negative; a step test may read the response up to a tick early
        lo = 0.0 if k == "rtt_ms" else -period_ms
        for p in ("p50", "p90", "p99", "mean", "min", "max"):
            if p in st and (p != "min" or k == "rtt_ms"):
                _number(st[p], f"latency.{k}.{p}", fail, lo, MAX_LATENCY_MS)
        if "n" in st and (not _is_int(st["n"]) or st["n"] < 1):
            fail(f"latency.{k}.n must be an integer >= 1, got {st['n']!r}")
    if "obs_noise_std" in sec:
        _number(sec["obs_noise_std"], "latency.obs_noise_std", fail, 0.0)
    if "control_hz" in sec and (not _is_number(sec["control_hz"]) or abs(sec["control_hz"] - hz) > 1e-6):
        fail(f"latency.control_hz is {sec['control_hz']!r}, the file's control_hz is {hz:g}")


def _check_normalization(sec: dict[str, Any], fail: Any, hz: float) -> None:
    _need(sec, "normalization", ("obs", "action", "action_limits"), fail)
    groups: dict[str, Any] = {f"obs.{k}": v for k, v in sec["obs"].items()} if isinstance(sec["obs"], dict) else {}
    if not groups:
        fail("normalization.obs must map observation keys to statistics")
    groups["action"] = sec["action"]
    for name, st in groups.items():
        if not isinstance(st, dict):
            fail(f"normalization.{name} must be an object")
        _need(st, f"normalization.{name}", ("mean", "std", "min", "max"), fail)
        n = len(_numbers(st["mean"], f"normalization.{name}.mean", fail))
        for k in ("std", "min", "max"):
            _numbers(st[k], f"normalization.{name}.{k}", fail, n)
        if any(s < 0 for s in st["std"]):
            fail(f"normalization.{name}.std has negative entries")
        if any(lo > hi for lo, hi in zip(st["min"], st["max"], strict=True)):
            fail(f"normalization.{name}: min > max (range inverted)")
        pct = st.get("percentiles", {})
        if not isinstance(pct, dict):
            fail(f"normalization.{name}.percentiles must be an object")
        for p, v in pct.items():
            _numbers(v, f"normalization.{name}.percentiles.{p}", fail, n)
    lim = sec["action_limits"]
    if not isinstance(lim, dict) or "low" not in lim or "high" not in lim:
        fail("normalization.action_limits needs 'low' and 'high'")
    low = _numbers(lim["low"], "normalization.action_limits.low", fail)
    high = _numbers(lim["high"], "normalization.action_limits.high", fail, len(low))
    if any(lo > hi for lo, hi in zip(low, high, strict=True)):
        fail("normalization.action_limits: low > high (range inverted)")


def _check_physics(sec: dict[str, Any], fail: Any, hz: float) -> None:
    _need(sec, "physics", ("params", "ranges", "control_delay_steps"), fail)
    if not isinstance(sec["params"], dict):
        fail(f"physics.params must map parameter kinds to numbers, got {type(sec['params']).__name__}")
    for k, v in sec["params"].items():
        if not _is_number(v):
            fail(f"physics.params.{k} must be a number, got {v!r}")
    try:
        check_params(sec["params"], "physics.params")
    except ValueError as e:
        fail(str(e))
    _delay_steps(sec["control_delay_steps"], "physics.control_delay_steps", fail, hz)
    if not isinstance(sec["ranges"], dict):
        fail("physics.ranges must map parameter kinds to [low, high]")
    for k, r in sec["ranges"].items():
        if k not in PARAM_KINDS:
            fail(f"physics.ranges: unknown parameter {k!r}; known: {sorted(PARAM_KINDS)}")
        if not isinstance(r, list) or len(r) != 2:
            fail(f"physics.ranges.{k} must be [low, high]")
        if not all(_is_number(x) for x in r):
            fail(f"physics.ranges.{k} = {r!r} must hold two numbers")
        lo, hi = r
        if lo > hi:
            fail(f"physics.ranges.{k} = [{lo}, {hi}] is inverted (low > high)")
        kind = PARAM_KINDS[k]
        if lo < kind.lower or hi > kind.upper:
            fail(f"physics.ranges.{k} = [{lo}, {hi}] leaves the allowed [{kind.lower}, {kind.upper}]")
        v = sec["params"].get(k)
        if v is not None and not lo - 1e-9 <= v <= hi + 1e-9:
            # randomizing over a range that leaves out the fit trains on robots other than this one
            fail(f"physics.ranges.{k} = [{lo}, {hi}] does not contain the fitted physics.params.{k} = {v}")
    if "sigma" in sec:
        if not isinstance(sec["sigma"], dict):
            fail("physics.sigma must map parameter kinds to standard errors")
        for k, v in sec["sigma"].items():
            _number(v, f"physics.sigma.{k}", fail, 0.0)
    for k in ("env", "dataset", "plot"):
        if k in sec and not isinstance(sec[k], str):
            fail(f"physics.{k} must be a string, got {type(sec[k]).__name__}")
    if "fit" in sec:
        _check_fit(sec["fit"], fail)


def _check_fit(fit: Any, fail: Any) -> None:
    """The fit report: ``check`` compares with its errors, so none may be a non-number or absurd."""
    if not isinstance(fit, dict):
        fail(f"physics.fit must be an object (the fit report), got {type(fit).__name__}")
    for k in ("error_before", "error_after", "error_global", "error_floor", "noise_floor"):
        if k in fit:
            _number(fit[k], f"physics.fit.{k}", fail, 0.0, MAX_REPLAY_ERROR)
    if "replay" in fit and fit["replay"] not in REPLAY_MODES:
        fail(f"physics.fit.replay must be one of {REPLAY_MODES}, got {fit['replay']!r}")
    if fit.get("latency_ms") is not None:
        lo, hi = _numbers(fit["latency_ms"], "physics.fit.latency_ms", fail, 2)
        if not -MAX_LATENCY_MS <= lo <= hi <= MAX_LATENCY_MS:
            fail(f"physics.fit.latency_ms = {fit['latency_ms']!r} must be [low, high] ms with low <= high")
    for k in ("joint_pos_rmse_rad", "effector_rmse_m"):
        if k in fit:
            for i, v in enumerate(_numbers(fit[k], f"physics.fit.{k}", fail, 2)):
                _number(v, f"physics.fit.{k}[{i}]", fail, 0.0)
    if "evals" in fit and (not _is_int(fit["evals"]) or fit["evals"] < 0):
        fail(f"physics.fit.evals must be an integer >= 0, got {fit['evals']!r}")
    if "seconds" in fit:
        _number(fit["seconds"], "physics.fit.seconds", fail, 0.0)
    for k in ("identifiability", "delay_scan", "convergence", "drift"):
        if k in fit and not isinstance(fit[k], dict):
            fail(f"physics.fit.{k} must be an object, got {type(fit[k]).__name__}")
