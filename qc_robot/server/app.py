"""The control server: a ZeroMQ ROUTER socket loop that serves one policy's chunks to many drivers.

Threads: one socket loop owns the ROUTER socket (handshakes, heartbeats, validation, replies);
inference runs on worker threads (``inference``) that hand encoded replies back over an inproc
socket, so a slow inference never stalls heartbeats or other drivers' handshakes. Each driver has
at most one queued observation: a newer one supersedes it (answered with an Error
``superseded``), and workers share themselves fairly between sessions (``scheduler``).

Admission before decoding: a message's envelope (version, type, request id) is read first; its
arrays are decoded only once its peer, session and type are admitted, only the observation keys
the policy reads, and JPEG images only for fields the session declared as images, checked from
their headers against the declared shape and decoded on a worker within the peer's decode budget.
Everything a peer can make the server keep is bounded per peer and in total (``held``) and
released when the peer leaves.

Robustness (docs/protocol.md section 11): a failure while handling one message becomes that
message's error reply; a thread that dies anyway marks the server failed (``failure``) and
``qc-robot serve`` exits non-zero so a supervisor restarts it. ZeroMQ refuses oversized messages
before buffering them (``MAXMSGSIZE``); error replies and their log lines are rate limited per
peer, with counts in ``stats``.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from qc_robot import protocol as P
from qc_robot.policies.base import Policy
from qc_robot.server.admission import DecodeBudget, DecodeLimits, FloodGuard, OutboxLedger
from qc_robot.server.checks import (
    auto_message_limit,
    check_hello,
    check_observation,
    check_transition,
)
from qc_robot.server.delayed import DelayedReplies
from qc_robot.server.episode_log import EpisodeLogger
from qc_robot.server.inference import Inference, Job, ServerStats
from qc_robot.server.learner_link import CurveKeys, LearnerLink
from qc_robot.server.metadata import policy_metadata
from qc_robot.server.ratelog import RateLimitedLog, TokenBuckets

__all__ = ["ControlServer", "ServerStats", "auto_message_limit"]

log = logging.getLogger("qc_robot.server")
_LOCAL_PREFIXES = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")
_ids = itertools.count()


@dataclass
class _Session:
    ident: bytes
    id: str
    driver: str
    last_seen: float
    decoding: P.Decoding
    """What this session's observations may decode: the policy's keys, its declared images."""
    served: int = 0
    calibration_id: str = ""
    """From the driver's Hello meta: recorded with each logged episode."""
    last_version: str = ""
    """Policy version of the last chunk sent to this driver (stamped on its transitions)."""
    episode_id: int = -1
    """Episode and start_step of the last accepted transition (step order)."""
    last_start: int = -1
    key: str | None = None
    """The driver's CURVE public key (z85) when the port uses CURVE: who owns its outbox ids."""


class ControlServer:
    """Serves ``policy`` on ``bind``. ``start()`` runs it on background threads; ``stop()`` ends it."""

    def __init__(self, policy: Policy, bind: str = "tcp://127.0.0.1:5555", *, workers: int = 1,
                 max_clients: int = 8, heartbeat_s: float = 1.0, session_timeout_s: float = 10.0,
                 episode_logger: EpisodeLogger | None = None, allow_remote: bool = False,
                 context: zmq.Context | None = None, learner_link: LearnerLink | None = None,
                 curve: CurveKeys | None = None, insecure_remote: bool = False, bye_grace_s: float = 0.5,
                 error_burst: float = 20.0, error_rate: float = 10.0, errors_total_rate: float = 200.0,
                 max_message_bytes: int = 0, decode_limits: DecodeLimits | None = None,
                 flood_guard: FloodGuard | None = None, max_inflight: int = 4, delay_ms: float = 0.0) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if not 0.0 <= delay_ms <= 10_000.0:
            raise ValueError(f"delay_ms must be in 0..10000, got {delay_ms}")
        if not bind.startswith(_LOCAL_PREFIXES):
            if not allow_remote:
                raise ValueError(f"refusing to bind {bind}: use loopback/ipc, or set allow_remote=true with CURVE "
                                 "keys (curve_secret_key + driver_authorized_dir)")
            if (curve is None or not curve.authorized_dir) and not insecure_remote:
                raise ValueError(f"refusing to bind {bind} without CURVE keys: anyone who reaches the port could "
                                 "drive the robot; set curve_secret_key and driver_authorized_dir, or "
                                 "insecure_remote=true on a network you trust")
        if curve is not None and not curve.authorized_dir:
            raise ValueError("CURVE on the driver port needs a directory of authorized driver keys")
        self.curve = curve
        self.bye_grace_s = bye_grace_s
        self.policy, self.spec, self.bind = policy, policy.spec, bind
        self.workers, self.max_clients = max(1, workers), max_clients
        self.heartbeat_s, self.session_timeout_s = heartbeat_s, session_timeout_s
        self.logger = episode_logger
        self.link = learner_link
        """Journals transitions for, and takes policy pushes from, a learner (qc-robot finetune)."""
        self.policy_version = int(self.spec.version) if str(self.spec.version).isdigit() else 0
        """Number of the served policy: 0 at start, then each accepted push's version."""
        if learner_link is not None:
            learner_link.attach(self)
        self.stats = ServerStats()
        self.max_message_bytes = max_message_bytes or auto_message_limit(policy.spec)
        """Larger messages are refused by ZeroMQ before buffering (0: derived from the spec)."""
        self.max_inflight = max_inflight
        """Observations queued per driver before a newer one supersedes the oldest: the requests a
        driver may pipeline (advertised as ``welcome.metadata.max_inflight``)."""
        self._delayed = DelayedReplies(delay_ms / 1e3) if delay_ms > 0 else None
        """Every reply to an observation leaves ``delay_ms`` after the observation arrived (an
        injected inference delay, to reproduce a slow robot PC or network)."""
        self.metadata = policy_metadata(policy)
        self.metadata.update(self._wire_metadata())
        self.address = ""
        """The bound endpoint (a concrete port when ``bind`` asked for ``*``)."""
        self.failure: BaseException | None = None
        """Set when a server thread died: the process should exit non-zero (``run_serve`` does)."""
        self._own_ctx = curve is not None and context is None  # ZAP authenticators are per context
        self._ctx = zmq.Context() if self._own_ctx else (context or zmq.Context.instance())
        self._auth: Any = None
        self._warn = RateLimitedLog(log)
        self._budget = TokenBuckets(error_burst, error_rate, 10 * error_burst, errors_total_rate)
        self._sessions: dict[bytes, _Session] = {}
        self._outboxes = OutboxLedger()
        self.decode_budget = DecodeBudget(decode_limits or DecodeLimits())
        self._flood = FloodGuard() if flood_guard is None else flood_guard  # (it has a len: not `or`)
        self._inference = Inference(lambda: self.policy, self.stats, self.decode_budget, self._warn,
                                    depth=max_inflight)
        self._results = f"inproc://qc-results-{next(_ids)}-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> ControlServer:
        loop = threading.Thread(target=self._guard, args=(self._loop,), name="qc-server-loop", daemon=True)
        self._threads = [loop] + [threading.Thread(target=self._guard, args=(self._worker,), name=f"qc-infer-{i}",
                                                   daemon=True) for i in range(self.workers)]
        loop.start()
        if not self._bound.wait(timeout) or self._start_error is not None:
            self._stop.set()
            raise RuntimeError(f"server could not bind {self.bind}: {self._start_error}")
        for t in self._threads[1:]:
            t.start()
        if self.link is not None:
            try:
                self.link.start(timeout)
            except RuntimeError:
                self.stop()
                raise
        log.info("serving policy %s (H=%d, A=%d, %.1f Hz) on %s", self.spec.version, self.spec.chunk_len,
                 self.spec.action_dim, self.spec.control_hz, self.address)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inference.queue.close()
        for t in self._threads:
            t.join(timeout + self.bye_grace_s)
        if self.logger is not None:
            self.logger.close()
        if self.link is not None:
            self.link.stop(timeout)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx and not any(t.is_alive() for t in self._threads):
            self._ctx.term()

    def alive(self) -> bool:
        """False once any thread of the server, its episode logger or its learner link has died."""
        return self.dead_thread() is None

    def dead_thread(self) -> str | None:
        """Name of a thread that died (None: all running, or stopped on purpose)."""
        if self.failure is not None:
            return f"server thread ({type(self.failure).__name__}: {self.failure})"
        if self._stop.is_set():
            return None
        if self.logger is not None and not self.logger.alive:
            return f"episode logger ({self.logger.failure})"
        if self.link is not None and not self.link.alive:
            return f"learner link ({self.link.failure})"
        if any(not t.is_alive() for t in self._threads):
            return "a server thread exited"
        return None

    def _guard(self, target: Any) -> None:
        """Run a thread's body; a body that raises marks the server failed instead of leaving a live
        process that answers nothing (every expected failure is handled per message inside)."""
        try:
            target()
        except BaseException as e:
            self.failure = e
            log.critical("server thread %s died: qc-robot serve exits with code 70", threading.current_thread().name,
                         exc_info=True)

    def _wire_metadata(self) -> dict[str, Any]:
        return {"max_message_bytes": self.max_message_bytes, "max_inflight": self.max_inflight}

    def held(self) -> dict[str, int]:
        """What peers currently make the server keep (each bounded per peer and in total;
        docs/protocol.md section 11). Read from the socket loop's structures without locking:
        for monitoring and tests."""
        ids, chars = self._outboxes.counts()
        return {"sessions": len(self._sessions), "queued_observations": len(self._inference.queue),
                "last_chunks": self._inference.kept(), "scheduler_tags": self._inference.queue.tags(),
                "outbox_ids": ids, "outbox_id_chars": chars, "error_budget_peers": len(self._budget),
                "decode_budget_peers": len(self.decode_budget), "flood_guard_peers": len(self._flood),
                "open_episodes": self.logger.open_episodes() if self.logger is not None else 0}

    def swap_policy(self, policy: Policy, version: int) -> None:
        """Serve ``policy`` from the next chunk on; a chunk in inference keeps the policy it started with."""
        self.metadata = {**policy_metadata(policy, str(policy.spec.version)), **self._wire_metadata()}
        self.policy, self.spec, self.policy_version = policy, policy.spec, version

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- socket loop ---------------------------------------------------------------------------

    def _open_router(self) -> zmq.Socket:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)  # refused by libzmq before buffering
        router.setsockopt(zmq.RCVHWM, 64)  # per connection: bounds what a flooding peer can queue
        router.setsockopt(zmq.SNDHWM, 256)  # replies to a peer that never reads are dropped beyond this
        # a driver that sets its own routing id keeps it (and its session) across ZeroMQ's
        # reconnects, e.g. after an over-size message made libzmq drop the connection
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=self.curve.authorized_dir)
            self.curve.apply(router, server=True)
        return router

    def _loop(self) -> None:
        router = results = None
        try:
            router = self._open_router()
            results = self._ctx.socket(zmq.PULL)
            _bind_retrying(router, self.bind)
            results.bind(self._results)
            self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, OSError) as e:
            self._start_error = e
            for sock in (router, results):
                if sock is not None:
                    sock.close(0)
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        next_sweep = time.monotonic() + 0.5
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._delayed.wait_ms(50) if self._delayed is not None else 50))
                if router in events:
                    for _ in range(16):  # bounded drain, then replies: a flood never delays chunks much
                        self._send_results(router, results)
                        if not self._drain(router, 16):
                            break
                self._send_results(router, results)
                if time.monotonic() > next_sweep:
                    self._expire_sessions()
                    next_sweep = time.monotonic() + 0.5
            self._say_bye(router)
        finally:
            if self.logger is not None:
                for s in self._sessions.values():
                    self.logger.end_session(s.id)
            router.close(0)
            results.close(0)

    def _drain(self, router: zmq.Socket, n: int) -> bool:
        """Handle up to ``n`` waiting messages; False when none are left.

        Fairness under a flood: of the messages read together, those of peers within their error
        budget are handled first, then those of peers that exhausted it (each peer's messages keep
        their order: a peer is in one class for the whole batch). So a well-behaved driver's
        observation reaches the inference worker before a flooder's backlog is worked off. A peer
        whose observations keep superseding each other is dropped unread (``FloodGuard``)."""
        batch: list[list[bytes]] = []
        keys: dict[bytes, str] = {}
        more = True
        for _ in range(n):
            try:
                if self.curve is None:
                    batch.append(router.recv_multipart(zmq.NOBLOCK))
                    continue
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                more = False
                break
            batch.append([f.bytes for f in parts])
            keys[batch[-1][0]] = str(parts[-1].get("User-Id"))  # the peer's public key, as ZAP authenticated it
        late = [f for f in batch if not self._budget.has_own_tokens(f[0])]
        if late:
            batch = [f for f in batch if self._budget.has_own_tokens(f[0])] + late
        for frames in batch:
            if self._flood.admit(frames[0]):
                self._on_frames(router, frames, keys.get(frames[0]))
            else:  # a peer flooding observations: dropped unread (docs/protocol.md section 11)
                self.stats.flood_dropped += 1
        return more

    def _send_results(self, router: zmq.Socket, results: zmq.Socket) -> None:
        for _ in range(256):
            try:
                ident, reply, version, t_recv = results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if self._delayed is not None:
                self._delayed.hold(struct.unpack("<d", t_recv)[0], ident, reply, version)
                continue
            self._send_result(router, ident, reply, version)
        for ident, reply, version in self._delayed.due() if self._delayed is not None else ():
            self._send_result(router, ident, reply, version)

    def _send_result(self, router: zmq.Socket, ident: bytes, reply: bytes, version: bytes) -> None:
        self._send(router, ident, reply)
        if ident in self._sessions and version:
            self._sessions[ident].last_version = version.decode()

    def _say_bye(self, router: zmq.Socket) -> None:
        """Tell every driver we are going, then keep the connections open until each has answered
        with its own bye (or ``bye_grace_s`` passed): a driver with IMMEDIATE=1 loses unread
        messages the moment the connection closes, so closing at once would drop the bye."""
        waiting = set(self._sessions)
        for ident in waiting:
            self._reply(router, ident, P.Bye("server stopping"))
        deadline = time.monotonic() + self.bye_grace_s
        while waiting and time.monotonic() < deadline:
            if not router.poll(max(1, int((deadline - time.monotonic()) * 1e3))):
                break
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            if len(frames) == 2 and frames[0] in waiting:
                try:
                    if P.read_envelope(frames[1], P.DRIVER_TYPES).kind == "bye":
                        waiting.discard(frames[0])
                except P.ProtocolError:
                    pass

    def _send(self, router: zmq.Socket, ident: bytes, data: bytes) -> None:
        try:
            router.send_multipart([ident, data], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a vanished or flooded peer must not stop the loop
            self._warn.warn("send", "could not reply to %s: %s", ident.hex(), e)

    def _reply(self, router: zmq.Socket, ident: bytes, msg: P.Message) -> None:
        self._send(router, ident, P.encode(msg))

    def _error(self, router: zmq.Socket, ident: bytes, code: str, message: str,
               request_id: int | None = None) -> None:
        """Refuse one message: counted always; answered and logged within the peer's error budget."""
        self.stats.error(code)
        session = self._sessions.get(ident)
        if code != P.ErrorCode.SUPERSEDED and not self._budget.take(ident):
            self.stats.unanswered += 1
            return
        who = f"driver {session.driver!r} ({session.id})" if session else f"peer {ident.hex()}"
        self._warn.warn(code, "%s: %s: %.300s", who, code, message)
        self._reply(router, ident, P.Error(code, message[:2000], request_id))

    def _on_frames(self, router: zmq.Socket, frames: list[bytes], key: str | None = None) -> None:
        """Handle one incoming message (``key``: its sender's CURVE key); whatever goes wrong
        becomes this message's error reply."""
        try:
            self._handle(router, frames, key)
        except Exception as e:  # a bug in handling one message must not stop the socket loop
            log.exception("internal error handling a message from %s", frames[0].hex())
            rid = _request_id(frames[1]) if len(frames) == 2 else None
            self._error(router, frames[0], P.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", rid)

    def _handle(self, router: zmq.Socket, frames: list[bytes], key: str | None) -> None:
        ident = frames[0]
        self.stats.received += 1
        if len(frames) != 2:
            self._error(router, ident, P.ErrorCode.BAD_MESSAGE,
                        f"expected exactly one frame after the routing id, got {len(frames) - 1}")
            return
        try:  # the envelope only: nothing in the message is decoded before it is admitted
            env = P.read_envelope(frames[1], P.DRIVER_TYPES)
        except P.ProtocolError as e:
            self._error(router, ident, e.code, str(e), e.request_id)
            return
        now = time.monotonic()
        session = self._sessions.get(ident)
        if session is not None:
            session.last_seen = now
        if env.kind in ("observation", "transition") and session is None:
            self._error(router, ident, P.ErrorCode.NO_SESSION, f"{env.kind} before handshake: send hello",
                        env.request_id)
            return
        try:
            msg = P.build(env, _message_decoding(session, env.kind))
        except P.ProtocolError as e:
            self._error(router, ident, e.code, str(e), e.request_id)
            return
        if isinstance(msg, P.Heartbeat):
            behind = self.link.learner_behind() if self.link is not None else -1
            self._reply(router, ident, P.Heartbeat(msg.seq, time.time(), behind))
        elif isinstance(msg, P.Describe):
            self._reply(router, ident, P.Description(self.metadata, msg.request_id))
        elif isinstance(msg, P.Hello):
            self._on_hello(router, ident, msg, now, key)
        elif isinstance(msg, P.Bye):
            if session is not None:
                self._warn.info("bye", "driver %r (%s) said bye: %.200s", session.driver, session.id, msg.reason)
                self._drop(ident)
        elif isinstance(msg, P.Observation):
            assert session is not None
            self._on_observation(router, ident, session, msg)
        elif isinstance(msg, P.Transition):
            assert session is not None
            self._on_transition(router, ident, session, msg, frames[1])
        else:  # pragma: no cover - read_envelope(accept=DRIVER_TYPES) refuses every other type
            self._error(router, ident, P.ErrorCode.UNKNOWN_TYPE, f"a driver may not send {msg.TYPE!r}")

    def _on_observation(self, router: zmq.Socket, ident: bytes, session: _Session, msg: P.Observation) -> None:
        try:
            obs = check_observation(self.spec, msg.obs)
        except ValueError as e:
            self._error(router, ident, P.ErrorCode.BAD_OBSERVATION, str(e), msg.request_id)
            return
        images = sum(v.nbytes for v in obs.values() if isinstance(v, P.PendingImage))
        if images:
            why = self.decode_budget.admit(ident, images)
            if why:
                self._error(router, ident, P.ErrorCode.RATE_LIMITED, f"{why}: JPEG observation refused; send fewer "
                            "or raw images", msg.request_id)
                return
        old = self._inference.queue.put(ident, Job(ident, session.id, msg, obs, time.perf_counter()))
        if old is not None:
            self._flood.superseded(ident)
            self._error(router, ident, P.ErrorCode.SUPERSEDED,
                        f"observation {old.msg.request_id} replaced by {msg.request_id} before inference",
                        old.msg.request_id)

    def _on_transition(self, router: zmq.Socket, ident: bytes, session: _Session, msg: P.Transition,
                       raw: bytes) -> None:
        """Check against the served spec and the session's step order, then journal and log.

        A refused transition gets ``bad_transition`` naming the field; the episode's other
        transitions are unaffected (the log records the gap as ``missing_steps``). A transition
        from a driver's outbox (``outbox_seq`` > 0) is acknowledged once recorded, or refused for
        good; one this peer's outbox already had recorded (a re-send) is only acknowledged again.
        Outbox ids are scoped to the peer: another peer's id suppresses nothing; with CURVE, an id
        held by a connected driver with another key is refused without an ack (the outbox tries
        again later)."""
        if msg.outbox_seq and self._outboxes.done(ident, msg.outbox, msg.outbox_seq):
            self._reply(router, ident, P.Ack(msg.outbox_seq))
            return
        if (msg.outbox_seq and len(msg.outbox) <= P.MAX_OUTBOX_ID
                and not self._outboxes.claim(ident, session.key, msg.outbox)):
            # not acknowledged: the outbox sends it again, and it is recorded once the id is free
            self._error(router, ident, P.ErrorCode.BAD_TRANSITION,
                        f"transition.outbox {msg.outbox!r} is in use by a driver with another key")
            return
        try:
            if len(msg.outbox) > P.MAX_OUTBOX_ID:
                raise ValueError(f"transition.outbox: an id of {len(msg.outbox)} characters, at most "
                                 f"{P.MAX_OUTBOX_ID} accepted")
            tr = check_transition(self.spec, msg)
            if msg.episode_id == session.episode_id and msg.start_step <= session.last_start:
                raise ValueError(f"transition.start_step {msg.start_step} is out of order: episode {msg.episode_id}'s "
                                 f"last transition started at step {session.last_start}")
        except ValueError as e:
            self._error(router, ident, P.ErrorCode.BAD_TRANSITION, str(e))
            self._ack_outbox(router, ident, msg)  # refused for good: or an outbox re-sends it forever
            return
        session.episode_id, session.last_start = msg.episode_id, msg.start_step
        if not tr.policy_version and session.last_version:
            tr.policy_version = session.last_version
        try:
            if self.link is not None:  # journaled first: the learner's copy is the durable one
                self.link.record(session.id, session.driver, msg.policy_version or session.last_version, raw)
            if self.logger is not None:
                self.logger.add(session.id, session.driver, tr, session.calibration_id)
        except (OSError, ValueError) as e:  # disk full, journal record too large, ...
            self._error(router, ident, P.ErrorCode.INTERNAL, f"could not record the transition: {e}")
            return  # not acknowledged: an outbox sends it again later
        self.stats.transitions += 1
        self._ack_outbox(router, ident, msg)

    def _ack_outbox(self, router: zmq.Socket, ident: bytes, msg: P.Transition) -> None:
        if msg.outbox_seq:  # the driver's outbox may forget it now (docs/protocol.md, transition)
            if len(msg.outbox) <= P.MAX_OUTBOX_ID:  # an over-long id is acknowledged, never kept
                self._outboxes.acknowledged(ident, msg.outbox, msg.outbox_seq)
            self._reply(router, ident, P.Ack(msg.outbox_seq))

    def _on_hello(self, router: zmq.Socket, ident: bytes, hello: P.Hello, now: float, key: str | None) -> None:
        if ident not in self._sessions and len(self._sessions) >= self.max_clients:
            self._error(router, ident, P.ErrorCode.TOO_MANY_CLIENTS, f"server full ({self.max_clients} drivers)")
            return
        problems, warnings = check_hello(self.spec, hello)
        if problems:
            self._error(router, ident, P.ErrorCode.SPEC_MISMATCH, "; ".join(problems))
            return
        if ident in self._sessions:
            self._drop(ident, leaving=False)  # a repeated Hello restarts the session (a refused one keeps the old)
        s = _Session(ident, uuid.uuid4().hex[:12], hello.driver, now, self._decoding(hello),
                     calibration_id=str(hello.meta.get("calibration_id", "") or ""), key=key)
        self._sessions[ident] = s
        self._inference.open(ident)
        self._warn.info("hello", "driver %.100r connected: session %s (%d active)", hello.driver, s.id,
                        len(self._sessions))
        spec = self.spec
        self._reply(router, ident, P.Welcome(
            session=s.id, obs_spec=P.obs_spec_to_wire(spec.obs_fields), action_dim=spec.action_dim,
            chunk_len=spec.chunk_len, control_hz=float(spec.control_hz), action_low=spec.action_low,
            action_high=spec.action_high, policy_version=str(spec.version), actor_type=spec.actor_type,
            heartbeat_s=self.heartbeat_s, session_timeout_s=self.session_timeout_s,
            log_transitions=self.logger is not None or self.link is not None, warnings=warnings,
            metadata=self.metadata))

    def _decoding(self, hello: P.Hello) -> P.Decoding:
        """What a session's observations may decode: the policy's keys (others are dropped
        undecoded) and, as JPEG, the uint8 (H, W, 3) images among them the driver declared."""
        declared = {f["key"]: (tuple(f["shape"]), f["dtype"]) for f in hello.obs_spec}
        images = {f.key: tuple(f.shape) for f in self.spec.obs_fields
                  if len(f.shape) == 3 and f.shape[2] == 3 and str(f.dtype) == "uint8"
                  and declared.get(f.key) == (tuple(f.shape), "uint8")}
        return P.Decoding(obs_keys=frozenset(f.key for f in self.spec.obs_fields), images=images)

    def _drop(self, ident: bytes, leaving: bool = True) -> None:
        """End ``ident``'s session; ``leaving``: the peer is gone, forget everything kept for it."""
        s = self._sessions.pop(ident, None)
        self._inference.forget(ident)
        if leaving:
            self._outboxes.forget(ident)
        if s is not None and self.logger is not None:
            self.logger.end_session(s.id)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for ident, s in list(self._sessions.items()):
            if now - s.last_seen > self.session_timeout_s:
                self._warn.info("expired", "driver %.100r (session %s) silent for %.1f s: dropped", s.driver, s.id,
                                now - s.last_seen)
                self._drop(ident)
                # budgets outlive a bye (or a bye would refill them); both are bounded LRU maps
                self._budget.forget(ident)
                self.decode_budget.forget(ident)
                self._flood.forget(ident)

    # -- inference workers ---------------------------------------------------------------------

    def _worker(self) -> None:
        self._inference.run(self._ctx, self._results)


def _message_decoding(session: _Session | None, kind: str) -> P.Decoding | None:
    """What a message may decode: JPEG images (left pending) only in a session's observations;
    a transition's obs rows are (K, H, W, 3) arrays, never JPEG."""
    if session is None:
        return None
    if kind == "observation":
        return session.decoding
    return P.Decoding(obs_keys=session.decoding.obs_keys)


def _request_id(data: bytes) -> int | None:
    """The ``request_id`` of ``data`` where it can be read (for an internal error's reply)."""
    try:
        return P.read_envelope(data).request_id
    except P.ProtocolError as e:
        return e.request_id
    except Exception:
        return None


def _bind_retrying(sock: zmq.Socket, address: str, patience_s: float = 3.0) -> None:
    """Bind, retrying briefly on EADDRINUSE: ZeroMQ releases a closed socket's port asynchronously,
    so a server restarted on its old port can race its predecessor's teardown."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            sock.bind(address)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
