"""A simulated chain of Feetech STS servos behind a pseudo-terminal: the test stand-in for the USB
serial adapter of an SO-100/101 arm.

LeRobot's real robot class, its real ``FeetechMotorsBus``, the real ``scservo_sdk`` and pyserial
all run unchanged: the robot is given the pty's path as its ``port``, and this module answers the
Feetech protocol-0 packets that arrive on the other end. Written from the STS3215 memory map
(addresses below) and the protocol (``FF FF id len instr params checksum``), not from LeRobot's
code, so a wrong encoding on either side shows up as a failed test.

Physics: a servo with torque enabled reaches its goal (clamped to its position limits) before the
next read, the behaviour of a well-tuned position loop at 30 Hz; enabling torque holds the shaft
where it is; a servo with torque off stays where the "hand" puts it (``move``), which is how a
leader arm is read. ``block`` puts an obstacle in a joint's way (the shaft stops there whatever
the goal: a gripper closed on an object). Faults: ``corrupt`` (every reply fails its checksum),
``dead`` (the adapter is gone: nothing is answered and nothing reaches a servo),
``delay_replies`` (replies arrive after the SDK stopped waiting for them) and ``lose_writes``.

The servos run in a child process (``python feetech_sim.py FD``), driven through a socket pair:
in the test's own process they shared its interpreter lock with the SDK, whose reads poll the port
in a busy loop, and on a loaded machine they missed its reply window (CI under LeRobot 0.4.4).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import tty
from multiprocessing.connection import Connection
from typing import Any

# STS3215 memory map (EPROM then SRAM): address, bytes
FIRMWARE_MAJOR, FIRMWARE_MINOR, MODEL = 0, 1, 3
MIN_LIMIT, MAX_LIMIT, MAX_TORQUE_LIMIT, HOMING_OFFSET = 9, 11, 16, 31
TORQUE_ENABLE, GOAL_POSITION, TORQUE_LIMIT, LOCK, PRESENT_POSITION = 40, 42, 48, 55, 56
STS3215_MODEL = 777
RESOLUTION = 4096

PING, READ, WRITE, REG_WRITE, ACTION, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x82, 0x83
BROADCAST = 0xFE


def _checksum(body: bytes | list[int]) -> int:
    return ~sum(body) & 0xFF


def _sign_magnitude(value: int, sign_bit: int) -> int:
    """Feetech's signed registers: magnitude in the low bits, ``sign_bit`` set for negatives."""
    return (abs(value) & ((1 << sign_bit) - 1)) | ((1 << sign_bit) if value < 0 else 0)


def _from_sign_magnitude(raw: int, sign_bit: int) -> int:
    mag = raw & ((1 << sign_bit) - 1)
    return -mag if raw & (1 << sign_bit) else mag


class Servo:
    """One STS3215: a 256-byte register file plus the shaft's absolute position in ticks."""

    def __init__(self, servo_id: int, position: int = RESOLUTION // 2) -> None:
        self.mem = bytearray(256)
        self.mem[FIRMWARE_MAJOR], self.mem[FIRMWARE_MINOR] = 3, 10
        self.mem[MODEL : MODEL + 2] = STS3215_MODEL.to_bytes(2, "little")
        self.mem[5] = servo_id
        self._put(MAX_LIMIT, RESOLUTION - 1)
        self._put(MAX_TORQUE_LIMIT, 1000)  # factory defaults: full torque (EPROM, copied to RAM at power-up)
        self._put(TORQUE_LIMIT, 1000)
        self.actual = position
        """Absolute shaft position (ticks, 0..4095)."""
        self.obstacle: tuple[int, int] | None = None
        """(lowest, highest) absolute position the shaft can reach (None: free)."""
        self._put(GOAL_POSITION, position)  # at power-up the goal is where the shaft is
        self.log: list[tuple[int, bytes]] = []
        """Every (address, data) written, in order (tests read what reached the motor)."""

    @property
    def id(self) -> int:
        return self.mem[5]

    def _get(self, addr: int) -> int:
        return int.from_bytes(self.mem[addr : addr + 2], "little")

    def _put(self, addr: int, value: int) -> None:
        self.mem[addr : addr + 2] = (value & 0xFFFF).to_bytes(2, "little")

    @property
    def offset(self) -> int:
        return _from_sign_magnitude(self._get(HOMING_OFFSET), 11)

    @property
    def present(self) -> int:
        """Present_Position as the servo reports it: actual minus the homing offset."""
        return self.actual - self.offset

    @property
    def goal(self) -> int:
        return _from_sign_magnitude(self._get(GOAL_POSITION), 15)

    def read(self, addr: int, n: int) -> bytes:
        self._put(PRESENT_POSITION, _sign_magnitude(self.present, 15))
        return bytes(self.mem[addr : addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self.log.append((addr, bytes(data)))
        if addr == TORQUE_ENABLE and data[:1] == b"\x01" and not self.mem[TORQUE_ENABLE]:
            # enabling torque holds the shaft where it is (no jump to a stale goal)
            self._put(GOAL_POSITION, _sign_magnitude(self.present, 15))
        for i, b in enumerate(data):
            if addr + i not in (FIRMWARE_MAJOR, FIRMWARE_MINOR, MODEL, MODEL + 1, PRESENT_POSITION, PRESENT_POSITION + 1):
                self.mem[addr + i] = b
        self._track()

    def _track(self) -> None:
        if self.mem[TORQUE_ENABLE]:
            lo, hi = self._get(MIN_LIMIT), self._get(MAX_LIMIT)
            self.actual = max(lo, min(hi, self.goal)) + self.offset
            if self.obstacle is not None:
                self.actual = max(self.obstacle[0], min(self.obstacle[1], self.actual))


STAND_IN_LATENCY_MS = 500
"""How long the SDK waits for a reply from the stand-in: 2 × this (1 s) plus the bytes' time. A
real adapter's reply comes within LeRobot's 50 ms; these servos answer from another process, which a
loaded machine can leave unscheduled for longer than that, and the read would then fail although
no test injected a fault (CI, beside other jobs). A dead bus still fails every read, only later."""


def _patient(port_handler: Any, packet_length: int) -> None:
    port_handler.packet_start_time = port_handler.getCurrentTime()
    port_handler.packet_timeout = port_handler.tx_time_per_byte * (packet_length + 3) + 2.0 * STAND_IN_LATENCY_MS


def _patient_sdk() -> None:
    """Give the stand-in ``STAND_IN_LATENCY_MS``: in the SDK's own timeout, and in the one LeRobot
    puts on each bus it makes (``patch_setPacketTimeout``: 50 ms plus the bytes' time), which
    replaces the SDK's. Buses made from now on get it; the tests import LeRobot first."""
    try:
        import scservo_sdk.port_handler as ph
    except ImportError:  # the tests that need it skip
        return
    ph.LATENCY_TIMER = max(ph.LATENCY_TIMER, STAND_IN_LATENCY_MS)
    lerobot_feetech = sys.modules.get("lerobot.motors.feetech.feetech")
    if lerobot_feetech is not None and hasattr(lerobot_feetech, "patch_setPacketTimeout"):
        lerobot_feetech.patch_setPacketTimeout = _patient


class FeetechBusSim:
    """Servos on a pty, run in a child process; ``port`` is the path to give the robot. Use as a
    context manager. Every method runs in the child (see ``_Bus``)."""

    def __init__(self, ids: list[int], positions: list[int] | None = None) -> None:
        _patient_sdk()  # the SDK runs here, in the test's process
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):  # blocking whatever socket.setdefaulttimeout says (the xArm SDK sets 1 s)
            end.setblocking(True)
        self._proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._call_lock = threading.Lock()
        self._final: dict[int, dict[str, Any]] | None = None  # each servo's readings at close
        self.port: str = self._call("start", list(ids), positions or [RESOLUTION // 2] * len(ids))

    def _call(self, name: str, *args: Any) -> Any:
        with self._call_lock:
            if self._conn.closed:
                if self._final is not None and args and args[0] in self._final and name in self._final[args[0]]:
                    return self._final[args[0]][name]  # what the servos ended with stays readable
                raise RuntimeError(f"the feetech stand-in is closed ({name})")
            try:
                self._conn.send((name, args))
                if not self._conn.poll(120.0):  # a hang guard, not a timing check
                    raise TimeoutError(f"the feetech stand-in did not answer {name}")
                ok, value = self._conn.recv()
            except (EOFError, OSError) as e:
                raise RuntimeError(f"the feetech stand-in process died (exit {self._proc.poll()})") from e
        if not ok:
            raise RuntimeError(f"feetech stand-in, {name}: {value}")
        return value

    def __enter__(self) -> FeetechBusSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._conn.closed:
            try:
                self._final = self._call("final")
                self._call("close")
            except RuntimeError:
                pass
            self._conn.close()
        try:
            self._proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @property
    def corrupt(self) -> bool:
        """True: every reply has a wrong checksum (a noisy cable); the SDK reports a corrupt packet."""
        return bool(self._call("get", "corrupt"))

    @corrupt.setter
    def corrupt(self, value: bool) -> None:
        self._call("set", "corrupt", value)

    @property
    def dead(self) -> bool:
        """True: the bus is gone (unplugged adapter, power loss): no packet is handled or answered."""
        return bool(self._call("get", "dead"))

    @dead.setter
    def dead(self, value: bool) -> None:
        self._call("set", "dead", value)

    def settle(self, timeout_s: float = 60.0) -> None:
        self._call("settle", timeout_s)

    def move(self, servo_id: int, actual: int) -> None:
        self._call("move", servo_id, actual)

    def block(self, servo_id: int, low: int, high: int) -> None:
        self._call("block", servo_id, low, high)

    def delay_replies(self) -> None:
        self._call("delay_replies")

    def lose_writes(self, address: int, n: int = 1) -> None:
        self._call("lose_writes", address, n)

    def send_late_replies(self) -> int:
        return int(self._call("send_late_replies"))

    def replies_held(self) -> bool:
        return bool(self._call("replies_held"))

    def present(self, servo_id: int) -> int:
        return int(self._call("present", servo_id))

    def goal(self, servo_id: int) -> int:
        return int(self._call("goal", servo_id))

    def actual(self, servo_id: int) -> int:
        return int(self._call("actual", servo_id))

    def torque(self, servo_id: int) -> bool:
        return bool(self._call("torque", servo_id))

    def writes(self, servo_id: int) -> list[tuple[int, bytes]]:
        return list(self._call("writes", servo_id))

    def poke(self, servo_id: int, address: int, data: bytes) -> None:
        self._call("poke", servo_id, address, data)


class _Bus:
    """The servos and the pty they answer on, in the child process; a thread serves the wire."""

    def __init__(self, ids: list[int], positions: list[int]) -> None:
        self.servos = {i: Servo(i, p) for i, p in zip(ids, positions, strict=True)}
        self.lock = threading.Lock()
        self.packets = 0
        self.errors: list[str] = []
        self._busy = False
        self.corrupt = False
        self.dead = False
        self._late: list[bytes] | None = None  # replies held back by ``delay_replies``
        self._lose: dict[int, int] = {}  # register address -> writes to it still to lose (``lose_writes``)
        self._replies_held = threading.Event()  # a reply has been held back: a read waits on it
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="feetech-sim", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- what a hand or a test does to the arm ----------------------------------------------------
    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until every byte sent so far has been handled (a sync write gets no reply, so a
        test reading registers right after one would otherwise race the servo thread). Returns as
        soon as it has; ``timeout_s`` is a hang guard, not a timing check."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():  # closed: nothing in flight
            pending, _, _ = select.select([self._master], [], [], 0)
            with self.lock:
                if not pending and not self._busy:
                    return
            time.sleep(0.0005)
        if not self._stop.is_set():
            raise TimeoutError("feetech sim did not settle")

    def move(self, servo_id: int, actual: int) -> None:
        """Put a (torque-off) servo's shaft at ``actual`` ticks, as an operator's hand would."""
        with self.lock:
            self.servos[servo_id].actual = actual

    def block(self, servo_id: int, low: int, high: int) -> None:
        """An obstacle: the shaft of ``servo_id`` stays within [low, high] absolute ticks."""
        with self.lock:
            servo = self.servos[servo_id]
            servo.obstacle = (low, high)
            servo.actual = max(low, min(high, servo.actual))

    def delay_replies(self) -> None:
        """Answer every request from now on only at ``send_late_replies``: a reply that arrives after
        the SDK stopped waiting for it (a stalled USB adapter or host), as a real bus can."""
        with self.lock:
            self._late = []
            self._replies_held.clear()

    def lose_writes(self, address: int, n: int = 1) -> None:
        """The next ``n`` single-servo writes to register ``address`` never reach a servo (a packet
        lost on the wire): no servo acts on them or answers, and the SDK times out."""
        with self.lock:
            self._lose[address] = n

    def send_late_replies(self) -> int:
        """Write the held replies now, in order, and answer at once again; how many there were."""
        with self.lock:
            late, self._late = self._late or [], None
            for reply in late:
                os.write(self._master, reply)
        return len(late)

    def replies_held(self) -> bool:
        return self._replies_held.is_set()

    def final(self) -> dict[int, dict[str, Any]]:
        """Each servo's readings, kept by the parent for a test's checks after ``close``."""
        return {i: {name: getattr(self, name)(i) for name in ("present", "goal", "actual", "torque", "writes")}
                for i in self.servos}

    def actual(self, servo_id: int) -> int:
        self.settle()
        with self.lock:
            return self.servos[servo_id].actual

    def poke(self, servo_id: int, address: int, data: bytes) -> None:
        """Write a servo's registers directly (what another tool left in its EPROM); not logged."""
        with self.lock:
            self.servos[servo_id].mem[address : address + len(data)] = data

    def present(self, servo_id: int) -> int:
        self.settle()
        with self.lock:
            return self.servos[servo_id].present

    def goal(self, servo_id: int) -> int:
        self.settle()
        with self.lock:
            return self.servos[servo_id].goal

    def torque(self, servo_id: int) -> bool:
        self.settle()
        with self.lock:
            return bool(self.servos[servo_id].mem[TORQUE_ENABLE])

    def writes(self, servo_id: int) -> list[tuple[int, bytes]]:
        """(address, data) of every write that reached servo ``servo_id``, in order."""
        self.settle()
        with self.lock:
            return list(self.servos[servo_id].log)

    # -- the wire -----------------------------------------------------------------------------------
    def _serve(self) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            with self.lock:
                self._busy = True
            try:
                buf += os.read(self._master, 4096)
            except OSError:
                return
            while True:
                start = buf.find(b"\xff\xff")
                if start < 0:
                    buf.clear()
                    break
                del buf[:start]
                if len(buf) < 4 or len(buf) < 4 + buf[3]:
                    break  # wait for the rest of the packet
                n = buf[3]
                packet, body = bytes(buf[: 4 + n]), bytes(buf[2 : 3 + n])
                del buf[: 4 + n]
                if packet[-1] != _checksum(body):
                    self.errors.append(f"bad checksum in {packet.hex()}")
                    continue
                if self.dead:
                    continue
                if packet[4] in (WRITE, REG_WRITE) and self._lose.get(packet[5], 0) > 0:
                    with self.lock:
                        self._lose[packet[5]] -= 1
                    continue
                with self.lock:
                    self.packets += 1
                    reply = self._handle(packet[2], packet[4], packet[5:-1])
                if reply and self.corrupt:
                    reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
                if reply:
                    with self.lock:
                        if self._late is not None:
                            self._late.append(reply)
                            self._replies_held.set()
                            continue
                        os.write(self._master, reply)
            with self.lock:
                self._busy = bool(buf)

    @staticmethod
    def _status(servo_id: int, data: bytes = b"") -> bytes:
        body = bytes([servo_id, len(data) + 2, 0]) + data
        return b"\xff\xff" + body + bytes([_checksum(body)])

    def _handle(self, sid: int, instr: int, params: bytes) -> bytes:
        if instr == SYNC_READ:
            addr, n = params[0], params[1]
            return b"".join(self._status(i, self.servos[i].read(addr, n)) for i in params[2:] if i in self.servos)
        if instr == SYNC_WRITE:
            addr, n = params[0], params[1]
            for k in range(2, len(params), n + 1):
                if params[k] in self.servos:
                    self.servos[params[k]].write(addr, params[k + 1 : k + 1 + n])
            return b""
        servo = self.servos.get(sid)
        if servo is None and sid != BROADCAST:
            return b""  # nobody answers: the SDK times out, as on a real bus
        if instr == PING:
            return self._status(sid)
        if instr == READ:
            return self._status(sid, servo.read(params[0], params[1]))
        if instr in (WRITE, REG_WRITE):
            targets = self.servos.values() if sid == BROADCAST else [servo]
            for s in targets:
                s.write(params[0], params[1:])
            return b"" if sid == BROADCAST else self._status(sid)
        if instr == ACTION:
            return b""
        self.errors.append(f"unsupported instruction {instr:#x}")
        return b""


def _child(fd: int) -> None:
    """The child process: build the bus on ``start``, then run each call the parent sends until
    ``close`` or until the parent is gone (its end of the socket closed, e.g. killed)."""
    os.set_blocking(fd, True)
    conn = Connection(fd)
    bus: _Bus | None = None
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            break
        try:
            if name == "start":
                bus = _Bus(*args)
                value: Any = bus.port
            elif bus is None:
                raise RuntimeError("not started")
            elif name == "get":
                value = getattr(bus, args[0])
            elif name == "set":
                with bus.lock:
                    setattr(bus, args[0], args[1])
                value = None
            elif name == "close":
                bus.close()
                conn.send((True, None))
                return
            else:
                value = getattr(bus, name)(*args)
        except Exception as e:  # noqa: BLE001 - the parent raises it with the call's name
            conn.send((False, repr(e)))
            continue
        conn.send((True, value))
    if bus is not None:
        bus.close()


if __name__ == "__main__":
    _child(int(sys.argv[1]))
