"""`qc-robot VERB [key=value ...] [--key value ...]`: one verb per user task.

Each verb composes ``configs/<verb>.yaml`` with Hydra (overrides in Hydra syntax; ``--key value``
is accepted as ``key=value``), validates it against the verb's dataclass schema, converts it to
plain dataclasses and calls one library function. Heavy imports happen only for the verb run,
so ``qc-robot serve`` on a robot PC never imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qc_robot.configs

CONFIG_DIR = Path(qc_robot.configs.__file__).resolve().parent


@dataclass(frozen=True)
class Verb:
    schema: str  # "module:Class"
    run: str  # "module:function", called with the config dataclass
    help: str
    subverbs: tuple[tuple[str, str], ...] = ()
    """Values of the first positional key, listed by ``--help`` (``dataset info FILE``)."""


VERBS: dict[str, Verb] = {
    "datagen": Verb("qc_robot.config:DatagenConfig", "qc_robot.sim.datagen:run_datagen",
                    "generate an offline play dataset in sim with OGBench's scripted oracles"),
    "train": Verb("qc_robot.config:TrainConfig", "qc_robot.train.learner:run_train",
                  "train the QC agent: offline updates, then online env steps"),
    "eval": Verb("qc_robot.config:EvalConfig", "qc_robot.train.evaluate:run_eval",
                 "success rate of a checkpoint in sim"),
    "export": Verb("qc_robot.config:ExportConfig", "qc_robot.export.onnx_export:run_export",
                   "export a checkpoint to a self-describing model.onnx"),
    "serve": Verb("qc_robot.server.config:ServeConfig", "qc_robot.server.serve:run_serve",
                  "serve an ONNX policy's action chunks over ZeroMQ"),
    "drive": Verb("qc_robot.drivers.config:DriveConfig", "qc_robot.drivers.drive:run_drive",
                  "run a robot driver (sim or real) against a policy server"),
    "fleet": Verb("qc_robot.fleet:FleetConfig", "qc_robot.fleet:run_fleet",
                  "N sim drivers as Ray actors against one server, each restarted on its outbox if it dies"),
    "finetune": Verb("qc_robot.finetune.config:FinetuneConfig", "qc_robot.finetune.loop:run_finetune",
                     "fine-tune a checkpoint online from robots' transitions via the server's learner port"),
    "teleop": Verb("qc_robot.teleop.config:TeleopConfig", "qc_robot.teleop.session:run_teleop",
                   "drive a robot from keyboard/gamepad/spacemouse and record demos (crash-safe)"),
    "replay": Verb("qc_robot.teleop.config:ReplayConfig", "qc_robot.teleop.replay:run_replay",
                   "play a recorded episode back through a driver: replay FILE episode=N"),
    "dataset": Verb("qc_robot.teleop.config:DatasetConfig", "qc_robot.data.tools:run_dataset",
                    "dataset info|validate|merge|split|recover|label|import|export FILE...",
                    (("info", "episodes, lengths, success rate and action ranges of FILE..."),
                     ("validate", "check FILE... against the robomimic layout train reads"),
                     ("merge", "concatenate FILE... into out=FILE"),
                     ("split", "write train/valid filters (mask/train, mask/valid) into FILE"),
                     ("recover", "commit the episodes a crashed teleop run left in FILE's journal"),
                     ("import", "a local LeRobotDataset FOLDER -> out=FILE.hdf5 (docs/lerobot.md)"),
                     ("export", "FILE.hdf5 -> out=FOLDER, a LeRobotDataset written by LeRobot's writer"))),
    "reward": Verb("qc_robot.reward.config:RewardConfig", "qc_robot.reward.train:run_reward",
                   "train a success detector on labelled episodes, report held-out rates, export to ONNX"),
    "demo": Verb("qc_robot.demo:DemoConfig", "qc_robot.demo:run_demo",
                 "the whole loop in one command: serve the shipped policy, drive the sim, summary"),
    "calibrate": Verb("qc_robot.calibration.cli:CalibrateConfig", "qc_robot.calibration.cli:run_calibrate",
                      "measure latency, dataset stats and sim physics into calibration/<robot_id>.json"),
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _is_override(arg: str) -> bool:
    """'a.b=c' or '+x=1' is an override of its own, not the value of a preceding flag."""
    key = arg.partition("=")[0].lstrip("+~")
    return "=" in arg and key.replace(".", "").replace("_", "").replace("-", "").isalnum()


def flags_to_overrides(args: list[str]) -> list[str]:
    """['--policy', 'm.onnx', '--x=1', 'a=b'] → ['policy=m.onnx', 'x=1', 'a=b']."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and len(a) > 2:
            key, eq, value = a[2:].partition("=")
            key = key.replace("-", "_")  # --log-dir → log_dir; values are left as written
            if eq:
                out.append(f"{key}={value}")
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and not _is_override(args[i + 1]):
                out.append(f"{key}={args[i + 1]}")
                i += 1
            else:
                out.append(f"{key}=true")
        else:
            out.append(a)
        i += 1
    return out


def positional_to_overrides(schema: Any, args: list[str]) -> list[str]:
    """Leading bare words → the fields named in ``schema.POSITIONAL`` (``dataset info f.hdf5``).

    If the last named field is a list it takes all remaining bare words.
    """
    names = list(getattr(schema, "POSITIONAL", ()))
    n = next((i for i, a in enumerate(args) if a.startswith("-") or "=" in a), len(args))
    if not names or n == 0:
        return args
    words = ["'" + w.replace("\\", "\\\\").replace("'", "\\'") + "'" for w in args[:n]]  # Hydra-quoted
    is_list = str({f.name: f.type for f in dataclasses.fields(schema)}[names[-1]]).startswith("list")
    if n > len(names) and not is_list:
        raise ValueError(f"too many positional arguments {args[:n]}; expected {' '.join(names)}")
    out = [f"{k}={w}" for k, w in zip(names[:-1] if is_list else names, words, strict=False)]
    if is_list and n >= len(names):
        out.append(f"{names[-1]}=[{','.join(words[len(names) - 1:])}]")
    return out + args[n:]


def open_dict_overrides(schema: Any, overrides: list[str]) -> list[str]:
    """``driver_args.obs_dim=28`` → ``++driver_args.obs_dim=28`` for the schema's free-form dict
    fields: their keys are not declared anywhere, so Hydra would demand a ``+`` the user cannot
    be expected to know about (``+`` and ``++`` written by the user are kept)."""
    dict_fields = {f.name for f in dataclasses.fields(schema) if str(f.type).startswith(("dict", "typing.Dict"))}
    out = []
    for o in overrides:
        key = o.partition("=")[0]
        if "=" in o and not o.startswith(("+", "~")) and key.partition(".")[0] in dict_fields and "." in key:
            o = "++" + o
        out.append(o)
    return out


def compose(verb: str, overrides: list[str], *, require: bool = True) -> Any:
    """The verb's config as a validated dataclass (``require``: every ``???`` key given)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from qc_robot.cli_checks import check_group_overrides
    from qc_robot.config import to_dataclass

    schema = _load(VERBS[verb].schema)
    check_group_overrides(CONFIG_DIR, overrides)
    # configs/<verb>.yaml lists "<verb>_schema" first in its defaults: the dataclass is the base
    # of the composed config, so every field can be overridden and unknown keys or bad types fail.
    ConfigStore.instance().store(name=f"{verb}_schema", node=schema)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = hydra_compose(config_name=verb, overrides=open_dict_overrides(schema, overrides))
    OmegaConf.resolve(cfg)
    return to_dataclass(schema, cfg, require=require)


def _usage() -> str:
    lines = ["usage: qc-robot VERB [key=value ...] [--key value ...] [--cfg] [--help] [-m]", "", "verbs:"]
    lines += [f"  {name:<9} {v.help}" for name, v in VERBS.items()]
    lines += ["", "qc-robot VERB --help lists the verb's keys with their documentation and examples;",
              "--cfg prints the composed config; configs live in configs/<verb>.yaml;",
              "-m sweeps with Hydra's launchers (qc-robot train -m training.seed=0,1,2).",
              "First run: qc-robot demo  (the shipped policy served and driven in the sim; nothing to train)"]
    return "\n".join(lines)


def quiet_known_warnings() -> None:
    """Headless MuJoCo (no DISPLAY: we never open a window) and OGBench's float64 Box bounds warn
    on every env build; neither is actionable for a user of the CLI."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*DISPLAY environment variable.*")
    warnings.filterwarnings("ignore", message=r".*precision lowered by casting.*")


def help_text(verb: str, overrides: list[str]) -> str:
    """``qc-robot VERB --help``, with the values ``overrides`` give (required keys may be unset)."""
    from dataclasses import asdict

    from qc_robot.cli_help import render_help

    v = VERBS[verb]
    cfg = compose(verb, overrides, require=False)
    return render_help(verb, v.help, _load(v.schema), asdict(cfg), CONFIG_DIR, dict(v.subverbs) or None)


def _print_quietly(text: str) -> int:
    """Print; a reader that closed the pipe early (``--help | head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def _missing_text(verb: str, keys: list[str]) -> str:
    """'missing required key checkpoint: a checkpoint.pt written by train (give checkpoint=...)'."""
    from qc_robot.config import config_keys

    docs = {k.key: k.doc for k in config_keys(_load(VERBS[verb].schema))}
    docs = {k: d.replace("``", "").removeprefix("Required: ").rstrip(".") for k, d in docs.items()}
    parts = [f"{k} ({docs[k]})" if docs.get(k) else k for k in keys]
    given = " ".join(f"{k}=..." for k in keys)
    return f"missing required key{'s' if len(keys) > 1 else ''} {', '.join(parts)}: give {given}"


def _bad_configuration(verb: str, msg: str) -> int:
    from qc_robot.cli_errors import EXIT_USAGE

    print(f"qc-robot {verb}: bad configuration: {msg} (qc-robot {verb} --help lists the keys)", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    from qc_robot.cli_errors import EXIT_USAGE, explain
    from qc_robot.config import MissingKeysError

    if argv is None:  # a process of its own (a robot's drive among them): a hard crash leaves its stack on stderr
        import faulthandler

        faulthandler.enable()
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"qc-robot: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    from qc_robot.cli_multirun import is_multirun

    if is_multirun(rest):
        from qc_robot.cli_checks import check_group_overrides
        from qc_robot.cli_errors import UserError
        from qc_robot.cli_multirun import multirun

        v = VERBS[verb]
        args = flags_to_overrides([a for a in rest if a not in ("-m", "--multirun")])
        try:  # before any job runs: Hydra would run a mistyped optional group as the default
            check_group_overrides(CONFIG_DIR, args)
        except UserError as e:
            return _bad_configuration(verb, str(e))
        return multirun(verb, _load(v.schema), _load(v.run), str(CONFIG_DIR), args)
    want_help = "--help" in rest or "-h" in rest
    show = "--cfg" in rest
    rest = [a for a in rest if a not in ("--cfg", "--help", "-h")]
    try:
        rest = flags_to_overrides(positional_to_overrides(_load(VERBS[verb].schema), rest))
        text = help_text(verb, rest) if want_help else ""
        cfg = None if want_help else compose(verb, rest, require=not show)
    except ModuleNotFoundError as e:  # a verb's schema lives with code that needs an extra
        from qc_robot.cli_errors import missing_extra_message

        print(f"qc-robot {verb}: {missing_extra_message(e, verb)}", file=sys.stderr)
        return EXIT_USAGE
    except MissingKeysError as e:
        print(f"qc-robot {verb}: {_missing_text(verb, e.keys)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # Hydra/OmegaConf errors: show the message, not a traceback
        from qc_robot.cli_errors import config_error_text

        return _bad_configuration(verb, config_error_text(e))
    if want_help:
        return _print_quietly(text)
    if show:
        from dataclasses import asdict

        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(asdict(cfg)))  # type: ignore[arg-type]  # a config dataclass
        return 0
    from qc_robot.cli_checks import preflight, subject_of

    def checked_run() -> int:
        preflight(verb, cfg)
        return _load(VERBS[verb].run)(cfg)

    return explain(verb, checked_run, subject_of(verb, cfg))


if __name__ == "__main__":
    sys.exit(main())
