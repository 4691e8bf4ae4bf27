"""The server side of the learner link: journal every transition, stream it, take policy pushes.

A learner (``qc-robot finetune``) connects a DEALER to this ROUTER (default
``tcp://127.0.0.1:5556``, apart from the drivers' port) and sends ``subscribe{from_seq}``. Every
Transition a driver sends is first appended to the :class:`~qc_robot.server.journal.Journal`
(durable, numbered), then streamed in ``transition_batch`` messages, at most ``window`` records
beyond the learner's last ``ack``. A learner that dies simply stops acking: the journal keeps
everything, nothing is queued in memory, and the control loop never waits (it only appends to
the journal). A learner that comes back subscribes from its checkpoint's seq and gets the rest;
unacked records are re-sent after ``resend_s`` of silence (the learner drops duplicates by seq).

``policy_push{version, onnx, sha256}`` is checked (checksum, version above the served one, same
spec), written under ``policy_dir`` and loaded on this link's thread, then swapped into the
server, which uses it from the next chunk on. Security: a non-loopback bind needs CURVE keys and a
directory of authorized learner public keys (ZeroMQ's ZAP, via ``zmq.auth``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zmq

from qc_robot import protocol as P
from qc_robot.policies.base import Policy, PolicySpec
from qc_robot.server.journal import Journal

log = logging.getLogger("qc_robot.learner_link")
LOCAL_PREFIXES = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


@dataclass
class CurveKeys:
    """ZeroMQ CURVE material: our key pair and (server) the authorized peers or (client) the server key."""

    public: bytes
    secret: bytes
    peer_public: bytes = b""
    """Client side: the server's public key."""
    authorized_dir: str = ""
    """Server side: directory of authorized learners' public key files (``*.key``)."""

    @classmethod
    def from_files(cls, secret_file: str, peer_public_file: str = "", authorized_dir: str = "") -> CurveKeys:
        """Load ``zmq.auth`` certificate files (``name.key_secret`` holds both keys of a pair)."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(secret_file)
        if not secret:
            raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
        peer = zmq.auth.load_certificate(peer_public_file)[0] if peer_public_file else b""
        return cls(public, secret, peer, authorized_dir)

    def apply(self, sock: zmq.Socket, server: bool) -> None:
        sock.curve_secretkey, sock.curve_publickey = self.secret, self.public
        if server:
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.peer_public


def make_keys(directory: str, name: str) -> tuple[str, str]:
    """Write a CURVE key pair ``name.key`` / ``name.key_secret`` into ``directory``; returns both paths."""
    import zmq.auth

    Path(directory).mkdir(parents=True, exist_ok=True)
    return zmq.auth.create_certificates(directory, name)


class PolicyHost(Protocol):
    """What the link needs from the control server (``ControlServer`` implements it)."""

    spec: PolicySpec
    policy_version: int

    def swap_policy(self, policy: Policy, version: int) -> None: ...


def same_spec(a: PolicySpec, b: PolicySpec) -> list[str]:
    """Differences that would break connected drivers if a policy with spec ``b`` replaced ``a``."""
    problems = []
    if [(f.key, f.shape) for f in a.obs_fields] != [(f.key, f.shape) for f in b.obs_fields]:
        problems.append(f"observation fields differ: {a.obs_fields} vs {b.obs_fields}")
    for name in ("action_dim", "chunk_len", "control_hz"):
        if getattr(a, name) != getattr(b, name):
            problems.append(f"{name} differs: {getattr(a, name)} vs {getattr(b, name)}")
    if not (np.array_equal(a.action_low, b.action_low) and np.array_equal(a.action_high, b.action_high)):
        problems.append("action limits differ")
    return problems


def _load_onnx(path: str, version: str) -> Policy:
    from qc_robot.policies.onnx_policy import OnnxPolicy  # onnxruntime only when a push arrives

    return OnnxPolicy(path, version=version)


@dataclass
class _Sub:
    ident: bytes
    learner: str
    cursor: int  # next seq to send
    acked: int  # every seq <= acked was received
    window: int
    last_seen: float
    last_progress: float
    behind: int = 0  # updates owed to its UTD target, as its last ack said


class LearnerLink:
    """Runs the learner port on its own thread; ``record`` is called by the server's socket loop."""

    def __init__(self, bind: str, journal: Journal, *, policy_dir: str | None = None,
                 curve: CurveKeys | None = None, heartbeat_s: float = 1.0, timeout_s: float = 10.0,
                 resend_s: float = 5.0, batch_records: int = 64, prune: bool = False,
                 policy_loader: Callable[[str, str], Policy] = _load_onnx) -> None:
        remote = not bind.startswith(LOCAL_PREFIXES)
        if remote and (curve is None or not curve.authorized_dir):
            raise ValueError(f"refusing to bind the learner link on {bind} without CURVE keys and an "
                             "authorized-keys directory (loopback/ipc needs none)")
        self.bind, self.journal, self.curve = bind, journal, curve
        self.policy_dir = Path(policy_dir) if policy_dir else journal.dir / "policies"
        self.heartbeat_s, self.timeout_s, self.resend_s = heartbeat_s, timeout_s, resend_s
        self.batch_records, self.prune = batch_records, prune
        self.policy_loader = policy_loader
        self.host: PolicyHost | None = None
        self.address = ""
        self.pushes: list[tuple[int, bool, str]] = []
        """(version, accepted, reason) of every push, for logs and tests."""
        self._ctx = zmq.Context()  # own context: the ZAP authenticator is per context
        self._auth: Any = None
        self._subs: dict[bytes, _Sub] = {}
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        """Set when the link's thread died (the server then exits non-zero)."""

    @property
    def alive(self) -> bool:
        """False once the link's thread has died (True before start and after a clean stop)."""
        return self.failure is None and (self._thread is None or self._stop.is_set() or self._thread.is_alive())

    # -- called by the control server ----------------------------------------------------------

    def learner_behind(self) -> int:
        """Updates the slowest subscribed learner owes its UTD target (-1: no learner heard from
        within ``timeout_s``). Read from the server's thread: a snapshot of the dict, no lock."""
        now = time.monotonic()
        live = [s.behind for s in list(self._subs.values()) if now - s.last_seen <= self.timeout_s]
        return max(live) if live else -1

    def attach(self, host: PolicyHost) -> None:
        self.host = host

    def accepted_policies(self) -> dict[int, Path]:
        """Version → file of every policy this journal's server accepted, across restarts (a
        refused push leaves no file)."""
        out = {}
        for f in self.policy_dir.glob("model-v*.onnx") if self.policy_dir.is_dir() else []:
            v = f.name[len("model-v"):-len(".onnx")]
            if v.isdigit():
                out[int(v)] = f
        return out

    def newest_version(self) -> int:
        """The highest version served or accepted by any run of this server (0: none)."""
        served = self.host.policy_version if self.host is not None else 0
        return max([served, *self.accepted_policies()])

    def record(self, session: str, driver: str, policy_version: str, transition: bytes) -> int:
        """Journal one encoded Transition (already validated); returns its seq. Never blocks on peers."""
        return self.journal.append({"session": session, "driver": driver, "policy_version": policy_version,
                                    "t": time.time(), "transition": transition})

    def start(self, timeout: float = 5.0) -> LearnerLink:
        self._thread = threading.Thread(target=self._guarded_loop, name="qc-learner-link", daemon=True)
        self._thread.start()
        if not self._bound.wait(timeout) or self._error is not None:
            self._stop.set()
            raise RuntimeError(f"learner link could not bind {self.bind}: {self._error}")
        log.info("learner link on %s (journal %s, next seq %d)", self.address, self.journal.dir,
                 self.journal.next_seq)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._auth is not None:
            self._auth.stop()
        self.journal.close()
        if self._thread is None or not self._thread.is_alive():  # term() would wait for its socket
            self._ctx.term()

    # -- socket loop ---------------------------------------------------------------------------

    def _open(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished learner raises instead of silently dropping
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)  # refused by libzmq before buffering
        if self.curve is not None:
            if self.curve.authorized_dir:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=self.curve.authorized_dir)
            self.curve.apply(sock, server=True)
        sock.bind(self.bind)
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _guarded_loop(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # every per-message failure is handled inside: this is a bug
            self.failure = e
            log.critical("learner link thread died", exc_info=True)

    def _loop(self) -> None:
        try:
            sock = self._open()
        except (zmq.ZMQError, OSError, ValueError) as e:
            self._error = e
            self._bound.set()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                if sock.poll(20):
                    for _ in range(256):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            self._on_frames(sock, frames)
                        except Exception as e:  # one message's failure is that message's error
                            log.exception("internal error handling a learner message")
                            self._send(sock, frames[0], P.Error(P.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))
                now = time.monotonic()
                for sub in list(self._subs.values()):
                    if now - sub.last_seen > self.timeout_s:
                        log.warning("learner %r silent for %.1f s: unsubscribed (journal keeps its data)",
                                    sub.learner, now - sub.last_seen)
                        del self._subs[sub.ident]
                        continue
                    if sub.acked < sub.cursor - 1 and now - sub.last_progress > self.resend_s:
                        log.warning("learner %r: no ack for %.1f s: re-sending from %d", sub.learner,
                                    now - sub.last_progress, sub.acked + 1)
                        sub.cursor, sub.last_progress = sub.acked + 1, now
                    self._stream(sock, sub)
            for sub in list(self._subs.values()):
                self._send(sock, sub.ident, P.Bye("server stopping"))
        finally:
            sock.close(0)

    def _send(self, sock: zmq.Socket, ident: bytes, msg: P.Message) -> bool:
        try:
            sock.send_multipart([ident, P.encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # gone (EHOSTUNREACH) or flooded (EAGAIN): never wait
            if e.errno == zmq.EHOSTUNREACH:
                self._subs.pop(ident, None)
            return False

    def _stream(self, sock: zmq.Socket, sub: _Sub) -> None:
        for _ in range(8):  # bounded per loop turn so incoming acks and pushes stay responsive
            room = sub.window - (sub.cursor - 1 - sub.acked)
            if room <= 0 or sub.cursor >= self.journal.next_seq:
                return
            records = self.journal.read(sub.cursor, min(room, self.batch_records))
            if not records:
                return
            if not self._send(sock, sub.ident, P.TransitionBatch(records)):
                return
            sub.cursor = records[-1]["seq"] + 1

    def _on_frames(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        ident = frames[0]
        if len(frames) != 2:
            self._send(sock, ident, P.Error(P.ErrorCode.BAD_MESSAGE, "expected one frame after the routing id"))
            return
        try:
            msg = P.decode(frames[1], P.LEARNER_TYPES)
        except P.ProtocolError as e:
            self._send(sock, ident, P.Error(e.code, str(e), e.request_id))
            return
        now = time.monotonic()
        sub = self._subs.get(ident)
        if sub is not None:
            sub.last_seen = now
        if isinstance(msg, P.Subscribe):
            first = self.journal.first_seq
            start = max(1, msg.from_seq, first)
            self._subs[ident] = _Sub(ident, msg.learner, start, start - 1, max(1, msg.window), now, now)
            log.info("learner %r subscribed from seq %d (journal %d..%d)", msg.learner, start, first,
                     self.journal.next_seq - 1)
            # the highest version ever accepted here, not only the one served now: a learner that
            # numbers its next push from it never reuses a number (after a restart of either side)
            self._send(sock, ident, P.Subscribed(self.journal.id, first, self.journal.next_seq, self.newest_version()))
        elif isinstance(msg, P.PolicyPush):
            self._send(sock, ident, self._on_push(msg))
        elif sub is None and isinstance(msg, P.Ack | P.Heartbeat):
            # a learner we do not know (we restarted, or it timed out): make it subscribe again
            self._send(sock, ident, P.Error(P.ErrorCode.NO_SESSION, "not subscribed: send subscribe"))
        elif isinstance(msg, P.Heartbeat):
            self._send(sock, ident, P.Heartbeat(msg.seq, time.time()))
        elif isinstance(msg, P.Ack):
            assert sub is not None
            if msg.seq > sub.acked:
                sub.acked, sub.last_progress = min(msg.seq, sub.cursor - 1), now
            sub.behind = max(0, msg.behind)
            if self.prune and msg.persisted_seq > 0:
                self.journal.prune(msg.persisted_seq)
        elif isinstance(msg, P.Bye):
            self._subs.pop(ident, None)
        else:
            self._send(sock, ident, P.Error(P.ErrorCode.UNKNOWN_TYPE, f"a learner may not send {msg.TYPE!r}"))

    def _on_push(self, msg: P.PolicyPush) -> P.PolicyAck:
        def refuse(reason: str) -> P.PolicyAck:
            log.warning("policy push v%d refused: %s", msg.version, reason)
            self.pushes.append((msg.version, False, reason))
            return P.PolicyAck(msg.version, False, reason)

        host = self.host
        if host is None:
            return refuse("this server takes no pushes")
        if hashlib.sha256(msg.onnx).hexdigest() != msg.sha256.lower():
            return refuse("sha256 mismatch: the file was corrupted in transit")
        if msg.version <= host.policy_version:
            return refuse(f"stale: version {msg.version} <= served version {host.policy_version}")
        newest = self.newest_version()
        if msg.version <= newest:  # one number, one policy: never two different files under one version
            return refuse(f"version {msg.version} <= {newest}, which this server accepted before (a restart "
                          "since): push a higher version")
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        path = self.policy_dir / f"model-v{msg.version}.onnx"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msg.onnx)
        os.replace(tmp, path)
        try:
            policy = self.policy_loader(str(path), str(msg.version))
            problems = same_spec(host.spec, policy.spec)
        except Exception as e:  # a file that does not load must not take the server down
            problems = [f"cannot load the policy: {type(e).__name__}: {e}"]
        if problems:
            path.unlink(missing_ok=True)  # only accepted policies stay (a restart serves the newest)
            return refuse("; ".join(problems))
        host.swap_policy(policy, msg.version)
        log.info("serving pushed policy version %d from the next chunk on", msg.version)
        self.pushes.append((msg.version, True, ""))
        return P.PolicyAck(msg.version, True)
