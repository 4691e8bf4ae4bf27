"""Teleoperation: devices, the recording session and replay."""
