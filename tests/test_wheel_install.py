"""The built wheel, installed into a fresh virtual environment, serves its shipped policy to the
sim driver with no training and no --policy (issue 15).

Slow (a wheel build, a venv, two CLI processes): ``python -m pytest -m slow tests/test_wheel_install.py``.
The fresh venv gets the package's dependencies from the running environment through a plain
path entry (no network; the running environment's editable install is not activated there),
and the wheel itself with ``--no-deps``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("qc_robot-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    py = root / "bin" / "python"
    clean = {"PATH": f"{root / 'bin'}:/usr/bin:/bin", "HOME": str(root)}  # no PYTHONPATH, no outer venv
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=clean).stdout.strip()
    # the wheel first: with the dependencies' path in place pip would see the running
    # environment's editable qc-robot as "already installed" and skip it
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300, env=clean)
    (Path(site) / "deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _shipped(wheel: Path) -> list[str]:
    return [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("qc_robot/assets/") and n.endswith(".onnx")]


def test_the_wheel_holds_the_configs(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"qc_robot/configs/env/{t}.yaml" for t in ("cube-single-task1", "cube-triple-task1")} <= set(names)
    assert "qc_robot/configs/demo.yaml" in names and "qc_robot/assets/__init__.py" in names


def test_the_wheel_ships_the_default_policy(wheel: Path):
    """The cube-single-task1 policy of docs/results.md section 4 (37/40 on fresh seeds) is in the wheel."""
    onnx = _shipped(wheel)
    assert onnx == ["qc_robot/assets/cube-single-task1.onnx"], onnx
    assert zipfile.ZipFile(wheel).getinfo(onnx[0]).file_size < 8 * 2**20  # a few MB at most


def test_nothing_but_qc_robot_is_installed_at_top_level(wheel: Path):
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"qc_robot"}


def test_installed_serve_and_drive_work_on_the_shipped_policy(venv: Path, wheel: Path, tmp_path: Path):
    """Right after install: `qc-robot serve` (no --policy) and `qc-robot drive driver=sim`, the
    README's first commands, answered by the shipped QC-FQL policy."""
    assert _shipped(wheel), "no shipped policy in the wheel"
    bin_ = venv / "bin"
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    where = subprocess.run([str(bin_ / "python"), "-c", "import qc_robot, qc_robot.sim; print(qc_robot.__file__, qc_robot.sim.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert str(REPO) not in where and str(venv) in where  # the installed copy, not the checkout
    address = f"tcp://127.0.0.1:{_free_port()}"
    server = subprocess.Popen([str(bin_ / "qc-robot"), "serve", f"bind={address}"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        drive = subprocess.run([str(bin_ / "qc-robot"), "drive", "driver=sim", f"server={address}", "episodes=2",
                                "realtime=false"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert drive.returncode == 0, drive.stdout + drive.stderr + log
    assert "episode 2/2" in drive.stdout and "success" in drive.stdout.splitlines()[-1]
    assert "(fql)" in drive.stdout  # the shipped policy answered, not a bring-up one
    assert elapsed < 120, elapsed
