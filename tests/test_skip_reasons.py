"""The skip messages point at what the README says (a newcomer follows them word for word)."""

from __future__ import annotations

import re
from pathlib import Path

from skip_reasons import LEROBOT_MISSING

TESTS = Path(__file__).resolve().parent
README = (TESTS.parent / "README.md").read_text()


def test_the_lerobot_skip_names_a_readme_section_and_its_install_command() -> None:
    section = re.search(r"the README's (\S+) section", LEROBOT_MISSING)
    assert section is not None and f"\n## {section.group(1)}\n" in README, LEROBOT_MISSING
    command = re.search(r"pip install [^:]+", LEROBOT_MISSING)
    assert command is not None and command.group(0) in README, LEROBOT_MISSING


def test_every_lerobot_skip_uses_the_shared_message() -> None:
    own = [p.name for p in TESTS.glob("test_*.py")
           if re.search(r'importorskip\("lerobot[^)]*reason="', p.read_text())]
    assert not own, f"a LeRobot skip with its own message (use skip_reasons.LEROBOT_MISSING): {own}"
