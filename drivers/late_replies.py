"""Discard servo replies that arrived after their read timed out (LeRobot motor buses).

The Feetech and Dynamixel SDKs flush only their *output* before a request. A reply that lands
after the SDK stopped waiting for it (a stalled USB adapter, or a host that did not run the
reading thread in time) stays in the serial input buffer, and the next read takes it as its own
answer: from then on every reading is one request old, and every command LeRobot clips against
the "present" position is clipped against a stale one. Emptying the input buffer before each
transaction costs one ``tcflush``; at that moment no reply is legitimately pending.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("qc_robot.lerobot")


def serial_ports(device: Any) -> list[Any]:
    """The pyserial ports of ``device``'s motor buses: LeRobot robots and teleoperators keep each
    bus as an attribute, the SDK's port handler as ``bus.port_handler``, pyserial's port as its ``ser``."""
    ports = []
    for value in vars(device).values():
        ser = getattr(getattr(value, "port_handler", None), "ser", None)
        if ser is not None and callable(getattr(ser, "reset_input_buffer", None)):
            ports.append(ser)
    return ports


def drop_late_replies(ports: list[Any]) -> None:
    for ser in ports:
        try:
            if ser.is_open:
                ser.reset_input_buffer()
        except Exception as e:  # noqa: BLE001 - a closed or vanished port: the read itself will say so
            log.debug("could not empty %s's input: %s", getattr(ser, "port", "the port"), e)
