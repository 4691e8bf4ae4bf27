"""``qc-robot VERB --help``: the verb's keys with their documentation, groups and examples.

Everything shown is read from the sources a user would otherwise have to open: key docs from
the docstring under each field of the verb's config dataclass (:func:`qc_robot.config.config_keys`),
current values from the composed config (so ``train experiment=smoke --help`` shows smoke's
values), groups from ``configs/<group>/*.yaml``, examples from the comment header of
``configs/<verb>.yaml``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

WIDTH = 100


def examples_from_yaml(path: Path, verb: str) -> list[str]:
    """Command lines in the leading comment block of ``path`` that start with ``qc-robot VERB``."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.search(rf"qc-robot {re.escape(verb)}(?=\s|$)(.*)", line)
        if m is None or m.group(1).lstrip().startswith(":") or not m.group(1).strip():
            continue  # a heading ("qc-robot serve: schema ...") or the bare verb
        rest = m.group(1)
        if ": " in rest.split("#")[0]:  # "qc-robot eval checkpoint=X: what it does"
            rest = rest.split(": ")[0]
        out.append(f"qc-robot {verb}{rest}".rstrip())
    return out


def groups_of(path: Path, config_dir: Path) -> list[tuple[str, str, list[str]]]:
    """``(group, default option, all options)`` for each config group in the verb's defaults."""
    from omegaconf import OmegaConf

    out = []
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    for entry in (loaded.get("defaults", []) if isinstance(loaded, dict) else []):
        if not isinstance(entry, dict):
            continue
        for key, default in entry.items():
            group = key.replace("optional ", "").strip()
            folder = config_dir / group
            if folder.is_dir():
                options = sorted(p.stem for p in folder.glob("*.yaml"))
                out.append((group, "" if default is None else str(default), options))
    return out


def _options_text(options: list[str], default: str) -> str:
    """Options, with runs like cube-single-task1..5 folded so 35 task names fit in a few lines."""
    folded: dict[str, list[str]] = {}
    for o in options:
        m = re.fullmatch(r"(.*-task)(\d+)", o)
        stem, n = (m.group(1), m.group(2)) if m else (o, "")
        folded.setdefault(stem, []).append(n)
    parts = []
    for stem, nums in folded.items():
        if len(nums) > 2 and all(nums):
            ns = sorted(int(n) for n in nums)
            parts.append(f"{stem}{ns[0]}..{ns[-1]}")
        else:
            parts += [stem + n for n in nums]
    text = ", ".join(parts)
    return f"{text}  (default: {default or 'none'})"


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, dict) and v:
                out.update(_flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    return {prefix.rstrip("."): data}


def render_help(verb: str, summary: str, schema: type, values: dict[str, Any], config_dir: Path,
                subverbs: dict[str, str] | None = None, extra_usage: str = "") -> str:
    """The text of ``qc-robot VERB --help``."""
    from qc_robot.config import MISSING, config_keys

    yaml_path = config_dir / f"{verb}.yaml"
    lines = [f"qc-robot {verb}: {summary}", ""]
    positional = " ".join(f"{n.upper()}..." if i == len(getattr(schema, "POSITIONAL", ())) - 1
                          and n.endswith("s") else n.upper()
                          for i, n in enumerate(getattr(schema, "POSITIONAL", ())))
    usage = f"usage: qc-robot {verb} {positional + ' ' if positional else ''}[key=value ...] [--key value ...]"
    lines += [usage + " [--cfg] [--help]" + extra_usage, ""]
    if schema.__doc__:
        lines += [textwrap.fill(" ".join(schema.__doc__.replace("``", "").split()), WIDTH), ""]
    if subverbs:
        lines.append("sub-verbs:")
        lines += [f"  {name:<10} {text}" for name, text in subverbs.items()]
        lines.append("")
    examples = examples_from_yaml(yaml_path, verb) if yaml_path.exists() else []
    if examples:
        lines.append("examples:")
        lines += [f"  {e}" for e in examples]
        lines.append("")
    groups = groups_of(yaml_path, config_dir) if yaml_path.exists() else []
    if groups:
        lines.append("config groups (group=option replaces a whole section):")
        for group, default, options in groups:
            lines.append(textwrap.fill(_options_text(options, default), WIDTH, initial_indent=f"  {group:<11} ",
                                       subsequent_indent=" " * 14, break_on_hyphens=False))
        lines.append("")
    flat = _flat(values)
    lines.append("keys (key = current value  [type]: what it does; '???' marks a required key):")
    for k in config_keys(schema):
        value = flat.get(k.key, "")
        shown = "??? (required)" if value == MISSING else repr(value) if isinstance(value, str) else value
        lines.append(f"  {k.key} = {shown}  [{k.type}]")
        if k.doc:
            lines.append(textwrap.fill(k.doc.replace("``", ""), WIDTH, initial_indent="      ",
                                       subsequent_indent="      ", break_on_hyphens=False))
    lines += ["", f"Overrides use Hydra syntax (key=value, +new_key=value for dict keys); "
              f"defaults: configs/{verb}.yaml; --cfg prints the composed config."]
    return "\n".join(lines)
