"""qc-robot: Q-chunking from MuJoCo to a real arm. Importing this package pulls in no torch."""

__version__ = "0.1.0"
