"""A learned success detector: ``qc-robot reward`` trains it on labelled episodes and exports it;
:mod:`qc_robot.policies.success_detector` runs it on the robot."""
