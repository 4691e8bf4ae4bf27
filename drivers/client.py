"""The robot-side ZeroMQ client: handshake, chunk requests, heartbeats, reconnects.

A DEALER socket talks to the server's ROUTER. Requests are asynchronous: ``request`` sends an
observation and returns its request id at once; ``poll`` returns the reply to the *outstanding*
request only. Replies to anything else (a request given up after a timeout, a superseded one, a
previous server) are counted and dropped, so a late reply is never executed at the wrong step.

Reconnecting: a request timeout, a ``no_session`` error (the server restarted) or a server Bye
make the client open a fresh socket (dropping anything queued for the old server) and send Hello
again, without blocking the control loop: ``request`` returns None until a Welcome is back. The
client says so (a warning when the session is lost, another with the time offline when it is
back) and counts the time without a session in ``stats.offline_s``.

Security: with ``curve`` (our key pair and the server's public key) the connection is encrypted
and authenticated with ZeroMQ CURVE; a server that does not know our key never answers.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from qc_robot import protocol as P
from qc_robot.drivers.outbox import Outbox

if TYPE_CHECKING:
    from qc_robot.server.learner_link import CurveKeys

log = logging.getLogger("qc_robot.client")


class HandshakeError(ConnectionError):
    """The server refused the driver (``error`` holds its Error) or did not answer."""

    def __init__(self, message: str, error: P.Error | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass
class ClientStats:
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    stale_dropped: int = 0
    timeouts: int = 0
    reconnects: int = 0
    lost: int = 0
    """Times an established session was lost (server gone, restarted or said bye)."""
    offline_s: float = 0.0
    """Seconds spent without a session after the first Welcome (``offline_now`` adds the current gap)."""


class PolicyClient:
    """Connects one driver to a policy server."""

    def __init__(self, address: str, hello: P.Hello, *, context: zmq.Context | None = None,
                 hello_retry_s: float = 0.5, curve: CurveKeys | None = None,
                 outbox: Outbox | None = None, jpeg_quality: int = 0) -> None:
        self.address, self.hello = address, hello
        if not 0 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 0..100, got {jpeg_quality}")
        self.jpeg_quality = jpeg_quality
        """1-100: observations send their uint8 (H, W, 3) images as JPEG (lossy; the server decodes
        them before the policy sees them); 0: raw. Transitions always go raw (lossless data)."""
        self.outbox = outbox
        """Transitions go through it (durable, acknowledged, re-sent) instead of fire-and-forget."""
        self.hello_retry_s = hello_retry_s
        self.curve = curve
        self._description: P.Description | None = None
        self._lost_at: float | None = None
        """When the session was lost (None: connected, or never connected yet)."""
        self._ever_welcomed = False
        self.welcome: P.Welcome | None = None
        self._policy_keys: set[str] | None = None  # the keys the welcome's policy reads (None: all)
        self.stats = ClientStats()
        self.last_error: P.Error | None = None
        self._ctx = context or zmq.Context.instance()
        self._routing_id = b"\x01" + os.urandom(15)
        """Our ZeroMQ routing id, random and kept for the client's life: the server keys our session
        by it, so the session survives ZeroMQ's reconnects (e.g. after the server dropped an
        over-size message of ours). A leading zero byte is reserved by ZeroMQ."""
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._outstanding: set[int] = set()  # requests sent and not answered (several when pipelining)
        self._hello_sent = -1e9
        self._last_send = 0.0
        self._hb_seq = 0
        self._pong: dict[int, float] = {}
        self.learner_behind = -1
        """The server's word on its learner, from its last heartbeat echo: updates owed to the UTD
        target (-1: no learner, or an older server)."""

    # -- connection ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.welcome is not None and self._sock is not None

    def connect(self, timeout_s: float = 10.0) -> P.Welcome:
        """Blocking handshake; raises HandshakeError if refused or unanswered within ``timeout_s``."""
        self._new_socket()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._maybe_send_hello()
            self._pump(min(0.05, max(0.0, deadline - time.monotonic())))
            if self.welcome is not None:
                return self.welcome
            if self.last_error is not None and self.last_error.code != P.ErrorCode.NO_SESSION:
                raise HandshakeError(f"server refused the driver: {self.last_error.code}: "
                                     f"{self.last_error.message}", self.last_error)
        raise HandshakeError(f"no answer from {self.address} within {timeout_s:.1f} s")

    def close(self) -> None:
        if self._sock is not None:
            sent = self.welcome is not None and self._send(P.Bye("driver closing"))
            self._sock.close(100 if sent else 0)  # long enough for the bye to leave
            self._sock = None
        self.welcome = None
        self._policy_keys = None

    def reconnect(self, linger_ms: int = 0) -> None:
        """Fresh socket and handshake in the background (``ready`` turns True on Welcome)."""
        self.stats.reconnects += 1
        log.warning("reconnecting to %s", self.address)
        self._new_socket(linger_ms)

    @property
    def offline_now(self) -> float:
        """``stats.offline_s`` plus the current time without a session, if any."""
        gap = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
        return self.stats.offline_s + gap

    def _session_lost(self, why: str) -> None:
        if self._ever_welcomed and self._lost_at is None:
            self._lost_at = time.monotonic()
            self.stats.lost += 1
            log.warning("lost the server at %s (%s): holding the robot and reconnecting", self.address, why)

    def describe(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The served policy's metadata (``describe``: works before and without a Hello)."""
        if self._sock is None:
            self._new_socket()
        rid = next(self._ids)
        deadline, next_send = time.monotonic() + timeout_s, 0.0
        self._description = None
        while time.monotonic() < deadline:
            if time.monotonic() >= next_send and self._send(P.Describe(rid)):
                next_send = time.monotonic() + self.hello_retry_s  # IMMEDIATE may drop it: resend
            self._pump(min(0.05, max(0.0, deadline - time.monotonic())))
            d = self._description
            if d is not None and d.request_id == rid:
                return d.metadata
        raise HandshakeError(f"no description from {self.address} within {timeout_s:.1f} s")

    def _new_socket(self, linger_ms: int = 0) -> None:
        if self._sock is not None:
            self._sock.close(linger_ms)
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, self._routing_id)
        s.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)  # refused before buffering
        if self.curve is not None:
            self.curve.apply(s, server=False)
        s.setsockopt(zmq.IMMEDIATE, 1)  # never queue requests for a server that is not there
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.connect(self.address)
        self._sock, self.welcome, self.last_error = s, None, None
        self._outstanding, self._hello_sent = set(), -1e9
        self._description = None
        if self.outbox is not None:
            self.outbox.rewind()  # a new session: whatever the old one did not acknowledge goes again

    def _maybe_send_hello(self) -> None:
        if self.welcome is None and time.monotonic() - self._hello_sent > self.hello_retry_s:
            if self._send(self.hello):
                self._hello_sent = time.monotonic()

    def _send(self, msg: P.Message) -> bool:
        assert self._sock is not None
        try:
            q = self.jpeg_quality if isinstance(msg, P.Observation) else 0
            self._sock.send(P.encode(msg, jpeg_quality=q), zmq.NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE) or flooded: the caller retries later
            return False
        self._last_send = time.monotonic()
        return True

    # -- requests ------------------------------------------------------------------------------

    def request(self, obs: dict[str, np.ndarray], episode_id: int, step: int, reset: bool = False,
                prev_start_step: int = -1, delay_steps: int = -1) -> int | None:
        """Send an observation; returns its request id, or None if it could not be sent now.

        ``prev_start_step``/``delay_steps``: real-time chunking hints (see ``protocol.Observation``)."""
        if not self.ready:
            self._maybe_send_hello()
            self._pump(0.0)
            if not self.ready:
                return None
        rid = next(self._ids)
        if self._policy_keys is not None:  # only what the policy reads: a camera it does not use costs nothing
            obs = {k: v for k, v in obs.items() if k in self._policy_keys}
        if not self._send(P.Observation(rid, episode_id, step, time.time(), obs, reset, prev_start_step,
                                        delay_steps)):
            return None
        self._outstanding.add(rid)
        self.stats.requests += 1
        return rid

    @property
    def max_inflight(self) -> int:
        """Observations the server queues per driver (its Welcome's ``max_inflight``; 1 from a
        server that predates pipelining): more in flight would supersede each other there."""
        w = self.welcome
        return max(1, int(w.metadata.get("max_inflight", 1))) if w is not None else 1

    def poll(self, timeout_s: float = 0.0) -> P.Chunk | P.Error | None:
        """A reply to an outstanding request if one is here (waiting up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._pump(max(0.0, deadline - time.monotonic()))
            if reply is not None or time.monotonic() >= deadline:
                return reply

    def cancel(self, timed_out: bool = False) -> None:
        """Forget the outstanding requests; their replies will be dropped. A timeout reconnects."""
        self._outstanding = set()
        if timed_out:
            self.stats.timeouts += 1
            self._session_lost("request timed out")
            self.reconnect()

    def send_transition(self, tr: P.Transition) -> bool:
        """Without an outbox fire-and-forget (False if not sent: not connected). With one, it is
        stored first and delivered as the server acknowledges (True: it is in the outbox)."""
        if self.outbox is None:
            return self.ready and self._send(tr)
        self.outbox.put(tr)
        self.deliver()
        return True

    def deliver(self) -> None:
        """Send what the outbox has due (called every control tick through ``heartbeat``)."""
        if self.outbox is None or self._sock is None:
            return
        if not self.ready:  # a new server: handshake again, then deliver what it never acknowledged
            self._maybe_send_hello()
        self._pump(0.0)  # take acknowledgements (or the Welcome) in first
        if not self.ready:
            return
        assert self._sock is not None
        for seq, data in self.outbox.due():
            try:
                self._sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.outbox.sent(seq)
            self._last_send = time.monotonic()

    def heartbeat(self) -> None:
        """Send a Heartbeat if nothing was sent for the server's heartbeat interval; deliver the
        outbox."""
        self.deliver()
        if self.ready and self.welcome and time.monotonic() - self._last_send > self.welcome.heartbeat_s:
            self.ping()

    def ping(self, timeout_s: float = 0.0) -> float | None:
        """Send a Heartbeat; with ``timeout_s`` > 0 wait for the echo and return the round trip (s)."""
        if self._sock is None:
            self._new_socket()
        self._hb_seq += 1
        seq, t0 = self._hb_seq, time.monotonic()
        if not self._send(P.Heartbeat(seq, time.time())):
            return None
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            self._pump(max(0.0, deadline - time.monotonic()))
            if seq in self._pong:
                return self._pong.pop(seq) - t0
        return None

    # -- receive -------------------------------------------------------------------------------

    def _pump(self, timeout_s: float) -> P.Chunk | P.Error | None:
        """Handle everything that arrived; return the reply to the outstanding request, if any."""
        if self._sock is None:
            return None
        if not self._sock.poll(int(timeout_s * 1e3)):
            return None
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                msg = P.decode(data)
            except P.ProtocolError as e:
                log.warning("undecodable message from server: %s", e)
                continue
            reply = self._handle(msg)
            if reply is not None:
                return reply

    def _handle(self, msg: P.Message) -> P.Chunk | P.Error | None:
        if isinstance(msg, P.Chunk):
            if msg.request_id not in self._outstanding:
                self.stats.stale_dropped += 1
                return None
            self._outstanding.discard(msg.request_id)
            self.stats.chunks += 1
            return msg
        if isinstance(msg, P.Welcome):
            if self.welcome is None:
                self.welcome = msg
                self._policy_keys = {str(f.get("key")) for f in msg.obs_spec} if msg.obs_spec else None
                self._ever_welcomed = True
                if self._lost_at is not None:
                    gap = time.monotonic() - self._lost_at
                    self.stats.offline_s += gap
                    self._lost_at = None
                    log.warning("server back at %s after %.1f s (session %s)", self.address, gap, msg.session)
                for w in msg.warnings:
                    log.warning("server: %s", w)
            return None
        if isinstance(msg, P.Description):
            self._description = msg
            return None
        if isinstance(msg, P.Heartbeat):
            if msg.seq > self._hb_seq - 8:  # only echoes a ping may still wait for: the rest are never read
                self._pong[msg.seq] = time.monotonic()
            for old in [s for s in self._pong if s <= self._hb_seq - 8]:
                del self._pong[old]
            self.learner_behind = msg.learner_behind
            return None
        if isinstance(msg, P.Ack):  # the server journaled our outbox up to msg.seq
            if self.outbox is not None:
                self.outbox.ack(msg.seq)
            return None
        if isinstance(msg, P.Bye):
            log.warning("server said bye: %s", msg.reason)
            self._session_lost(f"bye: {msg.reason}")
            self._send(P.Bye("ack"))  # the server waits for this before it closes the connection
            self.reconnect(linger_ms=100)
            return None
        if isinstance(msg, P.Error):
            self.stats.errors += 1
            self.last_error = msg
            mine = msg.request_id is not None and msg.request_id in self._outstanding
            if msg.code == P.ErrorCode.NO_SESSION and self.welcome is not None:
                self._session_lost("the server no longer knows our session (restarted?)")
                self._new_socket()
                self.stats.reconnects += 1
                return msg if mine else None
            if mine:
                self._outstanding.discard(msg.request_id)
                return msg
            if msg.request_id is None:
                log.warning("server error: %s: %s", msg.code, msg.message)
            else:
                self.stats.stale_dropped += 1
            return None
        log.warning("unexpected %s from server", msg.TYPE)
        return None

    def __enter__(self) -> PolicyClient:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
