"""Wording shared by the CLI's checks and error messages: a leaf module, imported by both
``cli_checks`` and ``cli_errors`` so that neither imports the other for it."""

from __future__ import annotations

import difflib


def fold_names(names: list[str]) -> str:
    """cube-single-task1, ..., cube-single-task5 → 'cube-single-task1..5'."""
    families: dict[str, list[int]] = {}
    for n in names:
        stem, _, num = n.rpartition("-task")
        families.setdefault(stem, []).append(int(num))
    return ", ".join(f"{stem}-task{min(v)}..{max(v)}" for stem, v in families.items())


def nearest(word: str, options: list[str]) -> str | None:
    """The option closest to a mistyped ``word`` ('frist_run' → 'first_run'), or None."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return close[0] if close else None


def shown_options(options: list[str]) -> str:
    """Options as listed in a message: task names folded into ranges, others comma-separated."""
    tasks = [o for o in options if "-task" in o and o.rpartition("-task")[2].isdigit()]
    return fold_names(tasks) if tasks and len(tasks) == len(options) else ", ".join(options)
