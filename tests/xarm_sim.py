"""A simulated UFactory xArm 6 control box on 127.0.0.1: the test stand-in for the real controller.

UFactory's own simulation runs on the control box (or their controller image), neither of which
is available here, so this answers the SDK's private Modbus-TCP protocol itself: frames of
``transaction id (u16 BE) | protocol 2 | length | register | params`` answered with a state byte
(0x40: the arm is in error) and the register's data (floats little-endian), plus the "normal"
report stream (state|mode, pose, error/warn codes, motor enable bits) the SDK waits for before it
moves. The real ``xarm-python-sdk`` talks to it unchanged: the simulator listens on the box's own
ports (502 and 30001) on a loopback address of its own (a random 127.x.y.z), so simulators of
parallel test runs never meet and the SDK needs no patching. Binding port 502 needs root (or
CAP_NET_BIND_SERVICE); ``XArmSim.available()`` says whether this machine allows it.

Modelled: version/SN, motion enable, mode, state (0 start, 3 pause, 4 stop; reported 1 moving /
2 ready / 4 stopped), error and warning codes, Cartesian moves (reached at once, or not at all
while ``frozen``: a blocked arm; ``yaw_stuck``: the wrist does not turn), the controller's own safety boundary (a target outside it stops
the arm with error 35, as the real box does), and the xArm Gripper behind the tool RS-485
(Modbus RTU: enable, mode, speed, target, position). The boundary follows the SDK's note that
reduced-mode settings take effect when reduced mode is set on: a box sent with
``set_reduced_tcp_boundary`` is only enforced from the next ``set_reduced_mode(True)``, with the
fence on. The reduced-mode states are read back as the SDK's ``get_reduced_states`` expects
(firmware ≥ 1.2.11 layout). That this is what the real box does is the SDK's documentation, not
a measurement. Faults: ``fail_pose_reads`` answers that many pose reads with a wrong function
code (the SDK reports an error code). Anything else is answered with "ok, no data" and listed in
``unknown``.
"""

from __future__ import annotations

import random
import socket
import struct
import threading

CONTROL_PORT, REPORT_PORT = 502, 30001

GET_VERSION, GET_ROBOT_SN, MOTION_EN, SET_STATE, GET_STATE, GET_CMDNUM = 1, 2, 11, 12, 13, 14
GET_ERROR, CLEAN_ERR, CLEAN_WAR, SET_MODE, MOVE_LINE, GET_TCP_POSE, GET_JOINT_POS = 15, 16, 17, 19, 21, 41, 42
SET_REDUCED_MODE, SET_LIMIT_XYZ, SET_FENSE_ON, RS485_RTU, TGPIO_W16B, TGPIO_R16B = 50, 52, 59, 124, 127, 128
SET_REDUCED_TRSV, GET_REDUCED_STATE = 47, 53
TGPIO_BAUD_REGISTER, TGPIO_BAUD_2M = 0x0A0B, 11  # the tool RS-485 baud index: 2 Mbaud (gripper default)
BOUNDARY_ERROR = 35
GRIPPER_TARGET, GRIPPER_POS, GRIPPER_ERR = 0x0700, 0x0702, 0x000F


class XArmSim:
    """The controller. ``port`` is where it listens; use as a context manager."""

    def __init__(self, version: str = "6,6,XS1305000001,AC1305000001,v1.12.10") -> None:
        self.version = version
        self.pose = [400.0, 0.0, 300.0, 3.14159265, 0.0, 0.0]  # x, y, z (mm), roll, pitch, yaw (rad)
        self.mode, self.state, self.enabled = 0, 4, False
        self.error, self.warn = 0, 0
        self.fence_on, self.reduced_on = False, False
        self.boundary = [9999.0, -9999.0, 9999.0, -9999.0, 9999.0, -9999.0]  # x max/min, y, z: as set
        self.active_boundary = list(self.boundary)
        """The boundary in force: ``boundary`` as it was at the last ``set_reduced_mode(True)``."""
        self.reduced_tcp_speed = 1000.0
        self.frozen = False
        """True: moves are accepted but the arm does not move (blocked)."""
        self.yaw_stuck = False
        """True: moves change the position but not the tool's yaw (a wrist that does not turn)."""
        self.fail_pose_reads = 0
        self.gripper = {"enabled": 0, "mode": 0, "speed": 0, "target": 0, "pos": 850}
        self.moves: list[tuple[int, list[float]]] = []
        """(mode, [x, y, z, roll, pitch, yaw, speed, acc, mvtime, radius]) of every accepted move."""
        self.unknown: set[int] = set()
        self.lock = threading.Lock()
        self.host, self._srv, self._report_srv = self._bind()
        self.report_interval_s = 0.01
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="xarm-sim", daemon=True)
        self._report_thread = threading.Thread(target=self._accept_report, name="xarm-sim-report", daemon=True)

    @staticmethod
    def _bind() -> tuple[str, socket.socket, socket.socket]:
        rng = random.Random()
        for _ in range(50):
            host = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            try:
                ctrl = socket.create_server((host, CONTROL_PORT))
            except PermissionError:
                raise
            except OSError:
                continue
            try:
                return host, ctrl, socket.create_server((host, REPORT_PORT))
            except OSError:
                ctrl.close()
        raise OSError("no free loopback address for the xArm simulator")

    @staticmethod
    def available() -> bool:
        """True when this process may listen on port 502 (root or CAP_NET_BIND_SERVICE)."""
        try:
            host, a, b = XArmSim._bind()
        except OSError:
            return False
        a.close()
        b.close()
        return True

    def __enter__(self) -> XArmSim:
        self._thread.start()
        self._report_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for s in [self._srv, self._report_srv, *self._conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._thread.join(2.0)
        self._report_thread.join(2.0)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            conn.settimeout(None)  # the SDK sets a 1 s process-wide default: an idle client is no dead one
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _accept_report(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._report_srv.accept()
            except OSError:
                return
            conn.settimeout(None)
            self._conns.append(conn)
            threading.Thread(target=self._push_reports, args=(conn,), daemon=True).start()

    def report(self) -> bytes:
        """One "normal" report frame (145 bytes, u32 BE length first)."""
        with self.lock:
            head = bytes([(self.mode << 4) | self.state]) + struct.pack(">H", 0)
            body = (head + struct.pack("<7f", *([0.0] * 7)) + struct.pack("<6f", *self.pose)
                    + struct.pack("<7f", *([0.0] * 7))
                    + bytes([0xFF if self.enabled else 0, 0xFF if self.enabled else 0, self.error, self.warn])
                    + struct.pack("<6f", *([0.0] * 6)) + struct.pack("<4f", *([0.0] * 4)) + bytes([3, 3])
                    + struct.pack("<3f", 0.0, 0.0, -1.0))
        return struct.pack(">I", 4 + len(body)) + body

    def _push_reports(self, conn: socket.socket) -> None:
        while not self._stop.wait(self.report_interval_s):
            try:
                conn.sendall(self.report())
            except OSError:
                return

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 7:
                tid, prot, length = struct.unpack(">HHH", buf[:6])
                if len(buf) < 6 + length:
                    break
                reg, params = buf[6], buf[7 : 6 + length]
                buf = buf[6 + length :]
                with self.lock:
                    out = self._handle(reg, params)
                    flag = 0x40 if self.error else (0x20 if self.warn else 0)
                    if reg == GET_TCP_POSE and self.fail_pose_reads > 0:
                        self.fail_pose_reads -= 1
                        reg ^= 0xFF  # a reply the SDK rejects (wrong function code)
                body = bytes([reg, flag]) + out
                try:
                    conn.sendall(struct.pack(">HHH", tid, prot, len(body)) + body)
                except OSError:
                    return

    # -- the controller ---------------------------------------------------------------------------
    def _inside(self, x: float, y: float, z: float) -> bool:
        xmax, xmin, ymax, ymin, zmax, zmin = self.active_boundary
        return xmin <= x <= xmax and ymin <= y <= ymax and zmin <= z <= zmax

    def _handle(self, reg: int, p: bytes) -> bytes:
        if reg == GET_VERSION:
            return self.version.encode().ljust(40, b"\0")
        if reg == GET_ROBOT_SN:
            return self.version.split(",")[2].encode().ljust(40, b"\0")
        if reg == MOTION_EN:
            self.enabled = bool(p[1])
            return b""
        if reg == SET_STATE:
            if p[0] == 0 and self.enabled and not self.error:
                self.state = 2
            elif p[0] in (3, 4):
                self.state = p[0]
            return b""
        if reg == GET_STATE:
            return bytes([self.state])
        if reg == GET_CMDNUM:
            return struct.pack(">H", 0)
        if reg == GET_ERROR:
            return bytes([self.error, self.warn])
        if reg == CLEAN_ERR:
            self.error = 0
            return b""
        if reg == CLEAN_WAR:
            self.warn = 0
            return b""
        if reg == SET_MODE:
            self.mode = p[0]
            self.state = 4  # a mode change needs set_state(0) again, as on the real box
            return b""
        if reg == MOVE_LINE:
            vals = list(struct.unpack("<10f", p[:40]))
            if self.error or self.state not in (1, 2) or not self.enabled:
                return b""  # ignored: the SDK sees the error flag or the arm simply does not move
            if self.fence_on and self.reduced_on and not self._inside(*vals[:3]):
                self.error, self.state = BOUNDARY_ERROR, 4
                return b""
            self.moves.append((self.mode, vals))
            if not self.frozen:
                self.pose = vals[:5] + [self.pose[5] if self.yaw_stuck else vals[5]]
            return b""
        if reg == GET_TCP_POSE:
            return struct.pack("<6f", *self.pose)
        if reg == GET_JOINT_POS:
            return struct.pack("<7f", *([0.0] * 7))
        if reg == SET_LIMIT_XYZ:
            self.boundary = [float(v) for v in struct.unpack("<6i", p[:24])]
            return b""
        if reg == SET_FENSE_ON:
            self.fence_on = bool(p[0])
            return b""
        if reg == SET_REDUCED_MODE:
            self.reduced_on = bool(p[0])
            if self.reduced_on:
                self.active_boundary = list(self.boundary)
            return b""
        if reg == SET_REDUCED_TRSV:
            self.reduced_tcp_speed = struct.unpack("<f", p[:4])[0]
            return b""
        if reg == GET_REDUCED_STATE:  # on, boundary (s16 BE), tcp/joint speed, 14 joint limits, fence, rebound
            return (bytes([int(self.reduced_on)]) + struct.pack(">6h", *(int(v) for v in self.boundary))
                    + struct.pack("<2f", self.reduced_tcp_speed, 3.14) + struct.pack("<14f", *([0.0] * 14))
                    + bytes([int(self.fence_on), 0]))
        if reg == RS485_RTU:
            return self._gripper(p)
        if reg == TGPIO_R16B:
            addr = struct.unpack(">H", p[1:3])[0]
            return struct.pack(">i", TGPIO_BAUD_2M if addr == TGPIO_BAUD_REGISTER else 0)
        if reg == TGPIO_W16B:
            return b""
        self.unknown.add(reg)
        return b""

    def _gripper(self, p: bytes) -> bytes:
        """Modbus RTU for the xArm Gripper (id 8) behind the tool's RS-485 (host id first)."""
        host, dev, func = p[0], p[1], p[2]
        addr, count = struct.unpack(">HH", p[3:7])
        g = self.gripper
        if func == 0x10:
            vals = p[8 : 8 + 2 * count]
            if addr == GRIPPER_TARGET:
                g["target"] = struct.unpack(">i", vals[:4])[0]
                if g["enabled"]:
                    g["pos"] = max(0, min(850, g["target"]))
            elif addr == 0x0100:
                g["enabled"] = struct.unpack(">H", vals[:2])[0]
            elif addr == 0x0101:
                g["mode"] = struct.unpack(">H", vals[:2])[0]
            elif addr == 0x0303:
                g["speed"] = struct.unpack(">H", vals[:2])[0]
            return bytes([host, dev, func]) + p[3:7]
        if func == 0x03:
            if addr == GRIPPER_POS:
                return bytes([host, dev, func, 4]) + struct.pack(">i", g["pos"])
            return bytes([host, dev, func, 2 * count]) + bytes(2 * count)
        return bytes([host, dev, func])
