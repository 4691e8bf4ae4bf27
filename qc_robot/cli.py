"""`qc-robot VERB [key=value ...] [--key value ...]`: one verb per user task.

Each verb composes ``configs/<verb>.yaml`` with Hydra (overrides in Hydra syntax; ``--key value``
is accepted as ``key=value``), validates it against the verb's dataclass schema, converts it to
plain dataclasses and calls one library function. Heavy imports happen only for the verb run,
so ``qc-robot serve`` on a robot PC never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Verb:
    schema: str  # "module:Class"
    run: str  # "module:function", called with the config dataclass
    help: str


VERBS: dict[str, Verb] = {
    "datagen": Verb("qc_robot.config:DatagenConfig", "sim.datagen:run_datagen",
                    "generate an offline play dataset in sim with OGBench's scripted oracles"),
    "train": Verb("qc_robot.config:TrainConfig", "qc_robot.train.learner:run_train",
                  "train the QC agent: offline updates, then online env steps"),
    "eval": Verb("qc_robot.config:EvalConfig", "qc_robot.train.evaluate:run_eval",
                 "success rate of a checkpoint in sim"),
    "export": Verb("qc_robot.config:ExportConfig", "qc_robot.export.onnx_export:run_export",
                   "export a checkpoint to a self-describing model.onnx"),
    "serve": Verb("qc_robot.server.config:ServeConfig", "qc_robot.server.app:run_serve",
                  "serve an ONNX policy's action chunks over ZeroMQ"),
    "drive": Verb("drivers.config:DriveConfig", "drivers.runner:run_drive",
                  "run a robot driver (sim or real) against a policy server"),
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


def compose(verb: str, overrides: list[str]) -> Any:
    """The verb's config as a validated dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from qc_robot.config import to_dataclass

    schema = _load(VERBS[verb].schema)
    # configs/<verb>.yaml lists "<verb>_schema" first in its defaults: the dataclass is the base
    # of the composed config, so every field can be overridden and unknown keys or bad types fail.
    ConfigStore.instance().store(name=f"{verb}_schema", node=schema)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = hydra_compose(config_name=verb, overrides=overrides)
    OmegaConf.resolve(cfg)
    return to_dataclass(schema, cfg)


def _usage() -> str:
    lines = ["usage: qc-robot VERB [key=value ...] [--key value ...] [--cfg]", "", "verbs:"]
    lines += [f"  {name:<9} {v.help}" for name, v in VERBS.items()]
    lines += ["", "--cfg prints the composed config and exits; configs live in configs/<verb>.yaml"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"qc-robot: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    show = "--cfg" in rest or "--help" in rest or "-h" in rest
    rest = [a for a in rest if a not in ("--cfg", "--help", "-h")]
    try:
        cfg = compose(verb, flags_to_overrides(rest))
    except Exception as e:  # Hydra/OmegaConf errors: show the message, not a traceback
        print(f"qc-robot {verb}: bad configuration: {e}", file=sys.stderr)
        return 2
    if show:
        from dataclasses import asdict

        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(asdict(cfg)))
        return 0
    result = _load(VERBS[verb].run)(cfg)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
