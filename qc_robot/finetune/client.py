"""The learner side of the learner link: a background thread that keeps a subscription alive.

The thread owns a DEALER socket to the server's learner port. It subscribes from the first
sequence number the learner has not applied, checks that records arrive gapless and in order
(a duplicate is dropped, a gap makes it subscribe again from the missing seq), hands them to the
training loop through a bounded queue and acknowledges them. Heartbeats run independently of
training, so a long update or export never looks like a dead learner; a server that goes silent
for ``timeout_s``, says bye, or no longer knows us (it restarted) gets a fresh socket and a new
subscription. Nothing here ever blocks the training loop for longer than the caller asks.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import zmq

from qc_robot import protocol as P
from qc_robot.server.learner_link import CurveKeys

log = logging.getLogger("qc_robot.finetune.client")


@dataclass
class Record:
    """One journaled transition as the learner receives it."""

    seq: int
    session: str
    driver: str
    policy_version: str
    t: float
    """Server clock (s) when the server journaled it."""
    transition: P.Transition


def _record(raw: dict) -> Record:
    tr = P.decode(raw["transition"])
    if not isinstance(tr, P.Transition):
        raise P.ProtocolError(f"journal record holds a {tr.TYPE}, not a transition")
    return Record(int(raw["seq"]), str(raw.get("session", "")), str(raw.get("driver", "")),
                  str(raw.get("policy_version", "")), float(raw.get("t", 0.0)), tr)


@dataclass
class LinkStats:
    received: int = 0
    duplicates: int = 0
    gaps: int = 0
    reconnects: int = 0
    undecodable: int = 0


class LearnerClient:
    """Subscribes to a server's journal from ``from_seq``; ``get`` returns records in seq order."""

    def __init__(self, address: str, from_seq: int = 1, *, name: str = "learner", window: int = 256,
                 max_queued: int = 4096, heartbeat_s: float = 1.0, timeout_s: float = 5.0,
                 curve: CurveKeys | None = None, journal_id: str = "") -> None:
        self.address, self.name, self.window = address, name, window
        self.max_queued, self.heartbeat_s, self.timeout_s = max_queued, heartbeat_s, timeout_s
        self.curve = curve
        self.journal_id = journal_id
        """The journal our seqs refer to ('' = unknown); a different one restarts from seq 1."""
        self.server_version = 0
        """Version of the policy the server serves, as last reported."""
        self.behind = 0
        """Updates the training loop owes its UTD target (it sets this); sent with every ack, so
        the server can tell its robots to wait at their reset (``drive learner_wait``)."""
        self.subscribed = threading.Event()
        self.stats = LinkStats()
        self._next = max(1, from_seq)  # next seq we expect (all below are in our queue or applied)
        self._acked = self._next - 1
        self._persisted = 0
        self._queue: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._outbox: collections.deque[P.Message] = collections.deque()
        self._pushes: dict[int, Future[P.PolicyAck]] = {}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        """What killed the link thread (None while it runs or after a clean close)."""
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._guarded_run, name="qc-learner-client", daemon=True)

    # -- the training loop's side -------------------------------------------------------------

    def start(self) -> LearnerClient:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """The link thread runs (False once it died; the training loop then exits non-zero)."""
        return self._thread.is_alive() or (self._stop.is_set() and self.error is None)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._ctx.term()

    def get(self, timeout_s: float = 0.0, max_records: int = 1024) -> list[Record]:
        """Records received since the last call (waits up to ``timeout_s`` for the first one)."""
        with self._cond:
            if not self._queue and timeout_s > 0:
                self._cond.wait(timeout_s)
            out: list[Record] = []
            while self._queue and len(out) < max_records:
                out.append(self._queue.popleft())
            return out

    def persisted(self, seq: int) -> None:
        """Tell the server that every record <= ``seq`` is in a learner checkpoint."""
        self._persisted = max(self._persisted, seq)

    def push_policy(self, version: int, onnx: bytes, timeout_s: float = 30.0) -> P.PolicyAck | None:
        """Send a new policy; returns the server's answer, or None if none came within ``timeout_s``."""
        fut: Future[P.PolicyAck] = Future()
        with self._cond:
            self._pushes[version] = fut
            self._outbox.append(P.PolicyPush(version, onnx, hashlib.sha256(onnx).hexdigest()))
        try:
            return fut.result(timeout_s)
        except TimeoutError:
            return None
        finally:
            with self._cond:
                self._pushes.pop(version, None)

    # -- the link thread -----------------------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve is not None:
            self.curve.apply(s, server=False)
        s.connect(self.address)
        return s

    def _guarded_run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - recorded: the training loop checks ``alive``
            self.error = e
            log.exception("the learner link thread died")
            with self._cond:
                self._cond.notify_all()

    def _run(self) -> None:
        sock = self._socket()
        last_rx = last_tx = time.monotonic()
        last_sub, hb = -1e9, 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_rx > self.timeout_s:  # dead or restarted server: start over
                    log.warning("no word from %s for %.1f s: reconnecting", self.address, now - last_rx)
                    sock.close(0)
                    sock, last_rx, last_sub = self._socket(), now, -1e9
                    self.subscribed.clear()
                    self.stats.reconnects += 1
                if not self.subscribed.is_set() and now - last_sub > 1.0:  # until Subscribed arrives
                    with self._cond:
                        frm = self._next
                    if self._send(sock, P.Subscribe(self.name, frm, self.window)):
                        last_tx = last_sub = now
                with self._cond:
                    outbox, self._outbox = list(self._outbox), collections.deque()
                for msg in outbox:
                    self._send(sock, msg)
                if self.subscribed.is_set():
                    ack = self._ack_value()
                    if ack > self._acked or now - last_tx > self.heartbeat_s:
                        self._send(sock, P.Ack(ack, self._persisted, self.behind))
                        self._acked = ack
                if now - last_tx > self.heartbeat_s:  # the echo tells us the server is alive
                    hb += 1
                    self._send(sock, P.Heartbeat(hb, time.time()))
                    last_tx = now
                if not sock.poll(20):
                    continue
                for _ in range(64):
                    try:
                        data = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_rx = time.monotonic()
                    try:
                        msg = P.decode(data)
                    except P.ProtocolError as e:
                        log.warning("undecodable message from the server: %s", e)
                        continue
                    if self._handle(msg):
                        self.subscribed.clear()
                        last_sub = -1e9
        finally:
            sock.close(0)
            for fut in self._pushes.values():
                if not fut.done():
                    fut.cancel()

    def _ack_value(self) -> int:
        """Acknowledge what we received, but only while our queue has room (backpressure)."""
        with self._cond:
            return self._next - 1 if len(self._queue) < self.max_queued else self._acked

    def _send(self, sock: zmq.Socket, msg: P.Message) -> bool:
        try:
            sock.send(P.encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected yet: retried on the next turn (pushes time out instead)
            return False

    def _handle(self, msg: P.Message) -> bool:
        """Process one message; returns True when we must subscribe again."""
        if isinstance(msg, P.Subscribed):
            if self.journal_id and msg.journal_id != self.journal_id:
                log.warning("server journal %s is not %s (a new journal): starting from its seq 1",
                            msg.journal_id, self.journal_id)
                with self._cond:
                    self._next = 1
                self.journal_id = msg.journal_id
                return True
            self.journal_id, self.server_version = msg.journal_id, msg.policy_version
            with self._cond:
                if self._next < msg.first_seq:
                    log.error("records %d..%d were pruned from the journal before we had them",
                              self._next, msg.first_seq - 1)
                    self._next = msg.first_seq
                self._acked = self._next - 1
            self.subscribed.set()
            log.info("subscribed to %s from seq %d (journal holds %d..%d; policy v%d)", self.address,
                     self._next, msg.first_seq, msg.next_seq - 1, msg.policy_version)
        elif isinstance(msg, P.TransitionBatch):
            return self._on_batch(msg)
        elif isinstance(msg, P.PolicyAck):
            if msg.accepted:
                self.server_version = max(self.server_version, msg.version)
            fut = self._pushes.get(msg.version)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, P.Error):
            if msg.code == P.ErrorCode.NO_SESSION:
                log.warning("server does not know us (restarted?): subscribing again")
                self.stats.reconnects += 1
                return True
            log.warning("server error: %s: %s", msg.code, msg.message)
        elif isinstance(msg, P.Bye):
            log.warning("server said bye: %s", msg.reason)
            self.subscribed.clear()
            return True
        return False

    def _on_batch(self, msg: P.TransitionBatch) -> bool:
        if not self.subscribed.is_set():
            return False  # left over from before a re-subscription
        with self._cond:
            for raw in msg.records:
                seq = raw.get("seq")
                if not isinstance(seq, int) or seq < self._next:
                    self.stats.duplicates += 1
                    continue
                if seq > self._next:  # something was lost in transit: ask again from the hole
                    log.warning("gap: expected seq %d, got %d: subscribing again", self._next, seq)
                    self.stats.gaps += 1
                    self.subscribed.clear()
                    return True
                try:
                    self._queue.append(_record(raw))
                except (P.ProtocolError, KeyError, TypeError, ValueError) as e:
                    log.error("journal record %d is undecodable (%s): skipped", seq, e)
                    self.stats.undecodable += 1
                self._next = seq + 1
                self.stats.received += 1
            self._cond.notify_all()
        return False
