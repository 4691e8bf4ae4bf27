"""Checks of a composed config before its verb runs: files that must exist, task names.

A failed check raises :class:`~qc_robot.cli_errors.UserError` with the one line to show, naming
the key to fix. Checks import only what they check with (``qc_robot.sim.tasks`` for a task name), so a
robot PC without the ``sim`` extra gets the extra's install hint for a sim verb, and nothing
for ``serve`` or ``drive driver=mock``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qc_robot.cli_errors import UserError
from qc_robot.cli_text import fold_names, nearest, shown_options

# verb → (config key holding a path that must exist, what it should be)
FILE_KEYS: dict[str, tuple[str, str]] = {
    "eval": ("checkpoint", "a checkpoint.pt written by qc-robot train"),
    "export": ("checkpoint", "a checkpoint.pt written by qc-robot train"),
    "finetune": ("checkpoint", "a checkpoint.pt written by qc-robot train"),
    "replay": ("path", "an HDF5 episode file"),
}
SIM_VERBS = ("datagen", "train", "eval", "demo")
"""Verbs that always build a sim task; drive, teleop, replay do so only with driver=sim."""


def preflight(verb: str, cfg: Any) -> None:
    """Raise UserError for the first mistake in ``cfg`` that would otherwise fail mid-run."""
    if verb == "demo" and cfg.finetune:  # the demo serves the checkpoint's own export
        need_file(cfg.finetune, "finetune", "a checkpoint.pt written by qc-robot train")
    elif verb in ("serve", "demo"):
        check_policy_ref(cfg.policy)
    if verb in FILE_KEYS:
        key, what = FILE_KEYS[verb]
        need_file(getattr(cfg, key), key, what)
    if verb == "dataset" and cfg.action not in ("recover", "import"):  # import reads a folder
        for p in cfg.paths[:1] if cfg.action == "label" else cfg.paths:  # label FILE DEMO VERDICT
            need_file(p, "paths", "an HDF5 episode file")
    name = getattr(getattr(cfg, "env", None), "name", "")
    if name and (verb in SIM_VERBS or getattr(cfg, "driver", "") == "sim"):
        check_task(name)
    if verb == "train":  # after the task: a robot PC is told the extra first, then the data
        check_dataset(cfg)
    if verb == "replay" and cfg.driver == "sim" and cfg.task:
        check_task(cfg.task, key="task")
    if verb == "fleet":
        from qc_robot.ray_pool import check_workers

        if cfg.driver not in ("sim", "mock"):
            raise UserError(f"driver={cfg.driver}: a fleet runs sim or mock drivers (drive a real arm with qc-robot drive)")
        if cfg.robots < 1 or cfg.max_restarts < 0:
            raise UserError(f"robots={cfg.robots}, max_restarts={cfg.max_restarts}: give robots >= 1, max_restarts >= 0")
        check_workers(cfg.robots, cfg.ray_address, "fleet", key="robots", always=True)
    if verb in ("eval", "datagen"):  # before anything loads: ray missing is one line, exit 2
        from qc_robot.ray_pool import check_workers

        check_workers(cfg.workers, cfg.ray_address, verb)
        if verb == "eval" and (cfg.workers > 1 or cfg.ray_address) and cfg.video:
            raise UserError(f"video: recorded in this process, so it needs workers=1 and no ray_address "
                            f"(not workers={cfg.workers} ray_address={cfg.ray_address!r})")
    if getattr(cfg, "video", ""):
        check_video(verb, cfg)
    viz = getattr(cfg, "viz", "")
    if viz:
        if viz != "rerun" and not viz.endswith(".rrd"):
            raise UserError(f"viz: {viz!r} is neither 'rerun' (spawn the viewer) nor a FILE.rrd")
        import rerun  # noqa: F401  (the viz extra; its absence is the one-line install hint)


def check_video(verb: str, cfg: Any) -> None:
    from qc_robot.video import check_video_path, use_offscreen_gl

    try:
        check_video_path(cfg.video)
    except ValueError as e:
        raise UserError(str(e)) from None
    if verb in ("drive", "demo") and (getattr(cfg, "driver", "sim") != "sim" or cfg.realtime):
        raise UserError("video: needs driver=sim realtime=false (rendering a frame takes longer than a "
                        "control period, so a wall-clock robot would run without its commands)")
    use_offscreen_gl()


def subject_of(verb: str, cfg: Any) -> str:
    """'checkpoint=PATH' / 'policy=PATH': the input file a verb's content errors are about."""
    if verb in FILE_KEYS:
        key = FILE_KEYS[verb][0]
        return f"{key}={getattr(cfg, key)}"
    if verb in ("serve", "demo"):
        return f"policy={cfg.policy}"
    return ""


def need_file(path: str, key: str, what: str) -> None:
    if not Path(path).is_file():
        state = "is a directory" if Path(path).is_dir() else "not found"
        raise UserError(f"{key}: {path} {state} (give {key}=PATH, {what})")


def check_policy_ref(ref: str) -> None:
    """``policy`` must be 'default', a scripted bring-up policy or an existing file."""
    from qc_robot.policies.scripted import scripted_from_ref

    if ref in ("", "default"):
        from qc_robot.assets import default_policy_path

        path = default_policy_path()
        if not path.is_file():
            raise UserError(f"policy: this install ships no default policy ({path.name} is not in {path.parent}); "
                            "give policy=model.onnx (from qc-robot export) or policy=hold:28:5:5 to bring up without one")
        return
    try:
        if scripted_from_ref(ref) is not None:
            return
    except ValueError as e:
        raise UserError(f"policy: {e}") from None
    need_file(ref, "policy", "a model.onnx from qc-robot export, 'default' for the shipped "
              "cube-single policy, or hold:OBS_DIM:ACT_DIM:H / random:OBS_DIM:ACT_DIM:H for bring-up")


def check_task(name: str, key: str = "env.name") -> None:
    from qc_robot.sim.tasks import list_tasks, task_spec  # needs the sim extra (gymnasium)

    try:
        task_spec(name)
    except ValueError:
        raise UserError(f"unknown task {name!r} ({key}; or env=NAME): registered tasks are "
                        f"{fold_names(list_tasks())}") from None


def check_group_overrides(config_dir: Path, overrides: list[str]) -> None:
    """Refuse ``GROUP=NAME`` when configs/GROUP/ has no NAME.yaml, for every config group and
    every value of a sweep (``agent=qc,qc_fql``, with or without ``-m``).

    Hydra itself skips a missing option of an ``optional`` default (``experiment``), so a typo
    would silently run the default config (under ``-m``: as one of the sweep's jobs)."""
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        group = config_dir / key
        if not eq or "." in key or not group.is_dir() or "(" in value:  # glob(...), choice(...): Hydra's
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for name in (v.strip().strip("'\"") for v in value.split(",")):
            if name in ("", "null") or name in options:
                continue
            guess = nearest(name, options)
            hint = f"did you mean {key}={guess}? " if guess else ""
            raise UserError(f"no {key} named {name!r} ({key}={name}); {hint}options: {shown_options(options)}")


def check_dataset(cfg: Any) -> None:
    """Offline training needs its dataset; the hint is the command that writes the kind it reads:
    task demonstrations (``data/demos-*.hdf5``, experiment=first_run) from the scripted operator as
    the README's main job records them, play data from ``datagen`` otherwise."""
    path = Path(cfg.data.path)
    if cfg.training.offline_steps <= 0 or path.exists():
        return
    env = cfg.env.name
    if path.name.startswith("demos"):
        make = (f"qc-robot teleop device=scripted env={env} oracle=plan oracle_noise=0.1 realtime=false "
                f"time_scale=1000 episodes={cfg.data.num_episodes} out={path}")
    else:
        make = f"qc-robot datagen env={env} data.path={path}"
    raise UserError(f"data.path: no dataset at {path}; write it first: {make}")
