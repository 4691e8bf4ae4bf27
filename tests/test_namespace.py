"""Everything qc-robot imports lives under ``qc_robot.*`` (issue 15): a user's own top-level
``drivers``/``sim``/``configs``/``policies``/``calibration`` packages, first on the path as in a
research repo, do not shadow ours. (The wheel's contents: tests/test_wheel_install.py, slow.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SHADOWS = ("sim", "drivers", "policies", "calibration", "configs")


def test_a_users_own_generically_named_packages_do_not_shadow_ours(tmp_path: Path):
    for name in SHADOWS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package')\n")
    code = ("import sys; from qc_robot.cli import main, compose\n"
            "drive = compose('drive', ['driver=mock']); serve = compose('serve', ['policy=hold:28:5:5'])\n"
            "from qc_robot.drivers.registry import make_safe_driver; make_safe_driver('mock').driver.reset(0)\n"
            f"print('ok', drive.driver, sorted(m for m in sys.modules if m.split('.')[0] in {SHADOWS!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "mock", "[]"]


def test_the_subpackages_resolve_to_the_top_level_folders_of_a_checkout():
    import qc_robot.calibration
    import qc_robot.configs
    import qc_robot.drivers
    import qc_robot.policies
    import qc_robot.sim

    root = Path(qc_robot.__file__).resolve().parent.parent
    for mod in (qc_robot.sim, qc_robot.drivers, qc_robot.policies, qc_robot.calibration, qc_robot.configs):
        assert Path(mod.__file__).resolve().parent.parent == root
