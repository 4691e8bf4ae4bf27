"""``qc-robot dataset info|validate|merge|split|recover|label|import|export``: inspect, check, edit
and convert episode files (import/export: LeRobotDatasets, ``qc_robot.data.lerobot_import``).

Files stay in our robomimic layout (``qc_robot.data.hdf5_io``), so the learner reads the result
directly. Edits (merge, split, label) build a new file beside the target and ``os.replace`` it, so an
interrupted edit never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import h5py
import numpy as np

from qc_robot.data import hdf5_io
from qc_robot.data.hdf5_io import DatasetError
from qc_robot.data.recorder import journal_path, locked, recover
from qc_robot.data.rewards import (
    FROM_VERDICT,
    VERDICTS,
    reward_source,
    verdict_rewards,
    with_reward_source,
)


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _demos(data: h5py.Group) -> list[str]:
    return sorted((k for k in data if k.startswith("demo_") and k[5:].isdigit()), key=lambda k: int(k[5:]))


def _env_args(path: str, f: h5py.File) -> dict[str, Any]:
    if not isinstance(f.get("data"), h5py.Group):
        raise DatasetError(f"{path}: not the robomimic layout: no group 'data'")
    return json.loads(_str(f["data"].attrs.get("env_args", "{}")))


def _episode_success(g: h5py.Group, ours: bool) -> bool:
    """Did this demo succeed? An explicit ``success`` attr decides. In our files ``dones`` is
    true termination, which the sim tasks raise only on success. robomimic files set ``dones``
    at the last step whatever happened (done_mode 1 and 2), so there a reward of 1 (its sparse
    success reward) marks success instead."""
    if "success" in g.attrs:
        return bool(g.attrs["success"])
    if ours:
        return "dones" in g and bool(np.asarray(g["dones"][()]).any())
    return "rewards" in g and bool((np.asarray(g["rewards"][()]) >= 1.0).any())


def info(path: str) -> dict[str, Any]:
    """Summary of ``path``: episodes, lengths, success rate, action ranges, NaNs, filters."""
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file not found")
    with h5py.File(path, "r") as f:
        env_args = _env_args(path, f)
        data = f["data"]
        ours = _str(data.attrs.get("format", "")) == hdf5_io.FORMAT
        names = _demos(data)
        complete = [n for n in names if "num_samples" in data[n].attrs]
        lengths = [int(data[n].attrs["num_samples"]) for n in complete]
        labels: dict[str, int] = {}
        successes = 0
        nans = 0
        lo = hi = None
        for n in complete:
            g = data[n]
            label = _str(g.attrs.get("label", ""))
            ok = _episode_success(g, ours)
            successes += ok
            label = label or ("success" if ok else "failure")
            labels[label] = labels.get(label, 0) + 1
            if "actions" in g:
                a = np.asarray(g["actions"][()], np.float64)
                nans += int((~np.isfinite(a)).sum())
                fin = np.where(np.isfinite(a), a, np.nan)
                lo = np.nanmin(fin, 0) if lo is None else np.fmin(lo, np.nanmin(fin, 0))
                hi = np.nanmax(fin, 0) if hi is None else np.fmax(hi, np.nanmax(fin, 0))
        masks = {k: len(v) for k, v in f["mask"].items()} if "mask" in f else {}
    return {"path": path, "env_args": env_args, "episodes": len(complete), "incomplete": len(names) - len(complete),
            "transitions": int(sum(lengths)), "length_min": min(lengths, default=0),
            "length_mean": float(np.mean(lengths)) if lengths else 0.0, "length_max": max(lengths, default=0),
            "success_rate": successes / len(complete) if complete else 0.0, "labels": labels,
            "action_min": [] if lo is None else [float(x) for x in lo],
            "action_max": [] if hi is None else [float(x) for x in hi],
            "action_nonfinite": nans, "filters": masks, "journal": os.path.exists(journal_path(path))}


def format_info(d: dict[str, Any]) -> str:
    env = d["env_args"]
    lines = [f"{d['path']}: {env.get('task', env.get('driver', '?'))} ({env.get('source', 'unknown source')})",
             f"  episodes     {d['episodes']}" + (f" (+{d['incomplete']} incomplete)" if d["incomplete"] else ""),
             f"  transitions  {d['transitions']}  (length min/mean/max {d['length_min']}/"
             f"{d['length_mean']:.1f}/{d['length_max']})",
             f"  success      {100 * d['success_rate']:.1f}%  " + "  ".join(f"{k}: {v}" for k, v in sorted(d["labels"].items())),
             "  actions      min [" + " ".join(f"{x:+.2f}" for x in d["action_min"]) + "]  max ["
             + " ".join(f"{x:+.2f}" for x in d["action_max"]) + "]"
             + (f"  NON-FINITE: {d['action_nonfinite']}" if d["action_nonfinite"] else "")]
    if d["filters"]:
        lines.append("  filters      " + "  ".join(f"mask/{k}: {v}" for k, v in sorted(d["filters"].items())))
    if d["journal"]:
        lines.append(f"  NOTE: an unrecovered recording journal is beside the file: run "
                     f"`qc-robot dataset recover {d['path']}`")
    return "\n".join(lines)


def validate(path: str) -> list[str]:
    """Problems found in ``path`` ([] = the learner loads it cleanly)."""
    problems = hdf5_io.validate(path)
    if os.path.exists(journal_path(path)):
        problems.append(f"{path}: an unrecovered recording journal {journal_path(path)} exists "
                        f"(run `qc-robot dataset recover {path}`)")
    return problems


def _atomic_write(out: str, build: Callable[[str], None]) -> None:
    """Run ``build(tmp)`` and move ``tmp`` over ``out`` only if it succeeded."""
    tmp = out + ".tmp"
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    try:
        build(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def merge(paths: Sequence[str], out: str) -> list[str]:
    """Concatenate the complete demos of ``paths`` into ``out`` (renumbered; same env_args needed).

    Each copied demo gets attrs ``source_file``/``source_demo``; a demo whose ``uuid`` was
    already copied is skipped. Filters (``mask/*``) are not carried over: split the result.
    """
    if not paths:
        raise DatasetError("merge needs at least one input file")
    if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
        raise DatasetError(f"merge: the output {out} is also an input; write to a new file")
    env_args: dict[str, Any] | None = None
    for p in paths:
        if problems := hdf5_io.validate(p, need_rewards=False):  # a demo without a verdict is merged as it is
            raise DatasetError(f"merge: {p} does not validate: {problems[0]}")
        with h5py.File(p, "r") as f:
            ea = _env_args(p, f)
        if env_args is None:
            env_args = ea
        elif ea != env_args and with_reward_source(ea) == with_reward_source(env_args):
            env_args = with_reward_source(env_args)  # one file predates the stated reward source
        elif ea != env_args:
            diff = sorted(k for k in set(ea) | set(env_args) if ea.get(k) != env_args.get(k))
            raise DatasetError(f"merge: {p} has different env_args from {paths[0]} (keys {diff})")
    names: list[str] = []

    def build(tmp: str) -> None:
        seen: set[str] = set()
        with h5py.File(tmp, "w") as dst:
            data = dst.create_group("data")
            data.attrs.update(env_args=json.dumps(env_args, sort_keys=True), format=hdf5_io.FORMAT,
                              format_version=hdf5_io.FORMAT_VERSION)
            total = 0
            for p in paths:
                with h5py.File(p, "r") as src:
                    for n in _demos(src["data"]):
                        g = src["data"][n]
                        uid = _str(g.attrs.get("uuid", ""))
                        if "num_samples" not in g.attrs or (uid and uid in seen):
                            continue
                        seen.add(uid)
                        name = f"demo_{len(names)}"
                        src.copy(g, data, name=name)
                        data[name].attrs.update(source_file=os.path.abspath(p), source_demo=n)
                        total += int(g.attrs["num_samples"])
                        names.append(name)
            data.attrs["total"] = total

    _atomic_write(out, build)
    return names


def split(path: str, ratio: float = 0.9, seed: int = 0, train_key: str = "train", valid_key: str = "valid",
          only_success: bool = False) -> tuple[list[str], list[str]]:
    """Write ``mask/<train_key>`` and ``mask/<valid_key>``: a seeded shuffle of the complete demos."""
    if not 0.0 <= ratio <= 1.0:
        raise DatasetError(f"split: ratio must be in [0, 1], got {ratio}")
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file not found")
    with locked(path):  # a recorder's commit must not race our replace
        return _split(path, ratio, seed, train_key, valid_key, only_success)


def _split(path: str, ratio: float, seed: int, train_key: str, valid_key: str,
           only_success: bool) -> tuple[list[str], list[str]]:
    with h5py.File(path, "r") as f:
        _env_args(path, f)
        data = f["data"]
        names = [n for n in _demos(data) if "num_samples" in data[n].attrs
                 and (not only_success or bool(data[n].attrs.get("success", True)))]
    if not names:
        raise DatasetError(f"split: {path} has no complete demos to split")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_train = int(round(ratio * len(names)))
    if len(names) >= 2 and 0.0 < ratio < 1.0:
        n_train = min(max(n_train, 1), len(names) - 1)  # both filters non-empty
    train = sorted(order[:n_train], key=lambda k: int(k[5:]))
    valid = sorted(order[n_train:], key=lambda k: int(k[5:]))

    def build(tmp: str) -> None:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            mask = f.require_group("mask")
            for key, demos in ((train_key, train), (valid_key, valid)):
                if key in mask:
                    del mask[key]
                mask.create_dataset(key, data=np.array([d.encode() for d in demos], dtype="S"))

    _atomic_write(path, build)
    return train, valid


def label(path: str, demo: str, verdict: str) -> None:
    """Set the verdict of ``data/<demo>`` (e.g. a recovered, 'unlabelled' episode): its ``label``
    and ``success`` attrs and, in a file whose rewards come from verdicts, its rewards and dones."""
    if verdict not in VERDICTS:
        raise DatasetError(f"label: the verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file not found")
    with locked(path):  # a recorder's commit must not race our replace
        with h5py.File(path, "r") as f:
            from_verdict = reward_source(_env_args(path, f)) == FROM_VERDICT
            g = f["data"].get(demo)
            if not isinstance(g, h5py.Group) or "num_samples" not in g.attrs:
                raise DatasetError(f"{path}: no complete data/{demo}")
            n = int(g.attrs["num_samples"])

        def build(tmp: str) -> None:
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as f:
                g = f["data"][demo]
                g.attrs.update(label=verdict, success=verdict == "success")
                out = verdict_rewards(verdict, n)
                if from_verdict and out is not None:
                    g["rewards"][...], g["dones"][...] = out

        _atomic_write(path, build)


def _convert(action: str, src: str, cfg: Any) -> str:
    """``dataset import`` (a LeRobotDataset folder → our HDF5) or ``export`` (the other way)."""
    if action == "import":
        from qc_robot.data.lerobot_import import import_folder

        return import_folder(src, cfg.out, image_size=cfg.image_size, label=cfg.label, normalize=cfg.normalize,
                             progress=sys.stderr.isatty()).text(src, cfg.out)
    from qc_robot.data.lerobot_export import export_file

    return export_file(src, cfg.out, video=cfg.use_videos, repo_id=cfg.repo_id, fps=cfg.fps,
                       progress=sys.stderr.isatty()).text(src, cfg.out)


def run_dataset(cfg: Any) -> int:
    """CLI entry of ``qc-robot dataset``; returns 1 when validate finds problems."""
    action, paths = cfg.action, list(cfg.paths)
    needs = {"info": 1, "validate": 1, "split": 1, "recover": 1, "merge": 1, "label": 3, "import": 1, "export": 1}
    if action not in needs:
        print(f"dataset: unknown action {action!r}; use one of {', '.join(needs)}", file=sys.stderr)
        return 2
    if action == "label" and len(paths) != 3:
        print("dataset label: give the file, the demo and the verdict: qc-robot dataset label FILE demo_3 "
              "success|failure", file=sys.stderr)
        return 2
    if action in ("import", "export") and (len(paths) != 1 or not cfg.out):
        what = "FOLDER out=FILE.hdf5" if action == "import" else "FILE.hdf5 out=FOLDER"
        print(f"dataset {action}: give one input and the output: qc-robot dataset {action} {what}", file=sys.stderr)
        return 2
    if len(paths) < needs[action]:
        print(f"dataset {action}: give the file(s): qc-robot dataset {action} FILE...", file=sys.stderr)
        return 2
    try:
        if action == "info":
            for p in paths:
                print(format_info(info(p)))
        elif action == "validate":
            bad = 0
            for p in paths:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    problems = validate(p)
                bad += bool(problems)
                print(f"{p}: OK" if not problems else "\n".join(f"INVALID {m}" for m in problems))
            return 1 if bad else 0
        elif action == "merge":
            if not cfg.out:
                print("dataset merge: name the output file: out=merged.hdf5", file=sys.stderr)
                return 2
            names = merge(paths, cfg.out)
            print(f"merged {len(names)} episodes from {len(paths)} files -> {cfg.out}")
        elif action == "split":
            for p in paths:
                tr, va = split(p, cfg.ratio, cfg.seed, cfg.train_key, cfg.valid_key, cfg.only_success)
                print(f"{p}: mask/{cfg.train_key} {len(tr)} demos, mask/{cfg.valid_key} {len(va)} demos (seed {cfg.seed})")
        elif action == "label":
            label(*paths)
            print(f"{paths[0]}: data/{paths[1]} is now a {paths[2]}")
        elif action in ("import", "export"):
            print(_convert(action, paths[0], cfg))
        elif action == "recover":
            for p in paths:
                with locked(p):
                    name = recover(p)
                print(f"{p}: recovered the unfinished episode as data/{name}" if name else f"{p}: nothing to recover")
    except (DatasetError, OSError) as e:
        print(f"dataset {action}: {e}", file=sys.stderr)
        return 2
    return 0
