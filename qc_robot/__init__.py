"""qc-robot: Q-chunking from MuJoCo to a real arm. Importing this package pulls in no torch.

The robot-side and tool packages are ``qc_robot.sim``, ``qc_robot.drivers``, ``qc_robot.policies``,
``qc_robot.calibration`` and ``qc_robot.configs``: the repository's top-level folders, linked into
this package (``qc_robot/sim -> ../sim``, ...), so the wheel installs nothing generically named at
the top level of site-packages.
"""

__version__ = "0.1.0"
