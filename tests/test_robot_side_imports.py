"""The robot PC needs neither torch nor MuJoCo: serve, drive and the protocol import without them."""

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "mujoco", "ogbench")


def test_serve_and_drive_import_with_torch_and_mujoco_blocked():
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked on the robot PC: " + name)
        sys.meta_path.insert(0, Block())
        import qc_robot.protocol, qc_robot.server.app, qc_robot.drivers.runner, qc_robot.drivers.drive, qc_robot.drivers.registry, qc_robot.policies.onnx_policy, qc_robot.teleop.operator, qc_robot.drivers.episode_stage
        import qc_robot.policies.success_detector
        from qc_robot.cli import compose
        serve, drive = compose("serve", ["policy=model.onnx"]), compose("drive", ["driver=mock"])
        from qc_robot.drivers.registry import make_safe_driver
        d = make_safe_driver("mock")
        d.driver.reset(0)
        print("ok", serve.bind, drive.driver, sorted(m for m in {BLOCKED!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "ok" and out.stdout.strip().endswith("[]")
