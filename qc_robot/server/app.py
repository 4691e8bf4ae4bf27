"""The control server: a ZeroMQ ROUTER socket loop that serves one policy's chunks to many drivers.

Threads: one socket loop owns the ROUTER socket (handshakes, heartbeats, validation, replies);
inference runs on worker threads that hand encoded replies back over an inproc socket, so a slow
inference never stalls heartbeats or other drivers' handshakes. Each driver has at most one
queued observation: a newer one supersedes it (answered with an Error ``superseded``), so the
queue is bounded by the number of drivers and nobody receives answers to stale observations.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from policies.base import Policy
from qc_robot import protocol as P
from qc_robot.server.checks import (
    check_hello,
    check_observation,
    check_transition,
    sanitize_actions,
)
from qc_robot.server.config import ServeConfig
from qc_robot.server.episode_log import EpisodeLogger
from qc_robot.server.learner_link import LearnerLink

log = logging.getLogger("qc_robot.server")
_LOCAL_PREFIXES = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")
_ids = itertools.count()


@dataclass
class _Session:
    ident: bytes
    id: str
    driver: str
    last_seen: float
    served: int = 0
    calibration_id: str = ""
    """From the driver's Hello meta: recorded with each logged episode."""
    last_version: str = ""
    """Policy version of the last chunk sent to this driver (stamped on its transitions)."""


@dataclass
class _Job:
    ident: bytes
    session: str
    msg: P.Observation
    obs: dict[str, np.ndarray]
    t_recv: float


@dataclass
class ServerStats:
    received: int = 0
    chunks: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    clipped_elements: int = 0
    clipped_chunks: int = 0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class ControlServer:
    """Serves ``policy`` on ``bind``. ``start()`` runs it on background threads; ``stop()`` ends it."""

    def __init__(self, policy: Policy, bind: str = "tcp://127.0.0.1:5555", *, workers: int = 1,
                 max_clients: int = 8, heartbeat_s: float = 1.0, session_timeout_s: float = 10.0,
                 episode_logger: EpisodeLogger | None = None, allow_remote: bool = False,
                 context: zmq.Context | None = None, learner_link: LearnerLink | None = None) -> None:
        if not allow_remote and not bind.startswith(_LOCAL_PREFIXES):
            raise ValueError(f"refusing to bind {bind}: the protocol is unauthenticated; use loopback/ipc "
                             "or set allow_remote=true on a trusted network")
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
        self.address = ""
        """The bound endpoint (a concrete port when ``bind`` asked for ``*``)."""
        self._ctx = context or zmq.Context.instance()
        self._sessions: dict[bytes, _Session] = {}
        self._slots: dict[bytes, _Job] = {}
        self._slots_lock = threading.Lock()
        self._ready: queue.Queue[bytes | None] = queue.Queue()
        self._results = f"inproc://qc-results-{next(_ids)}-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> ControlServer:
        loop = threading.Thread(target=self._loop, name="qc-server-loop", daemon=True)
        self._threads = [loop] + [threading.Thread(target=self._worker, name=f"qc-infer-{i}", daemon=True)
                                  for i in range(self.workers)]
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
        for _ in range(self.workers):
            self._ready.put(None)
        for t in self._threads:
            t.join(timeout)
        if self.logger is not None:
            self.logger.close()
        if self.link is not None:
            self.link.stop(timeout)

    def swap_policy(self, policy: Policy, version: int) -> None:
        """Serve ``policy`` from the next chunk on; a chunk in inference keeps the policy it started with."""
        self.policy, self.spec, self.policy_version = policy, policy.spec, version

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- socket loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        results = self._ctx.socket(zmq.PULL)
        try:
            router.setsockopt(zmq.LINGER, 0)
            _bind_retrying(router, self.bind)
            results.bind(self._results)
            self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            self._start_error = e
            router.close(0)
            results.close(0)
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        next_sweep = time.monotonic() + 0.5
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                for _ in range(256 if router in events else 0):  # bounded drain: stay responsive
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(router, frames)
                for _ in range(256 if results in events else 0):
                    try:
                        ident, reply, version = results.recv_multipart(zmq.NOBLOCK)
                        router.send_multipart([ident, reply])
                    except zmq.Again:
                        break
                    if ident in self._sessions and version:
                        self._sessions[ident].last_version = version.decode()
                if time.monotonic() > next_sweep:
                    self._expire_sessions()
                    next_sweep = time.monotonic() + 0.5
            for s in self._sessions.values():  # tell drivers we are going (best effort)
                router.send_multipart([s.ident, P.encode(P.Bye("server stopping"))], zmq.NOBLOCK)
        finally:
            if self.logger is not None:
                for s in self._sessions.values():
                    self.logger.end_session(s.id)
            router.close(0)
            results.close(0)

    def _reply(self, router: zmq.Socket, ident: bytes, msg: P.Message) -> None:
        try:
            router.send_multipart([ident, P.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a vanished or flooded peer must not stop the loop
            log.warning("could not reply to %s: %s", ident.hex(), e)

    def _error(self, router: zmq.Socket, ident: bytes, code: str, message: str,
               request_id: int | None = None) -> None:
        self.stats.error(code)
        log.warning("driver %s: %s: %s", ident.hex(), code, message)
        self._reply(router, ident, P.Error(code, message, request_id))

    def _on_frames(self, router: zmq.Socket, frames: list[bytes]) -> None:
        ident = frames[0]
        self.stats.received += 1
        if len(frames) != 2:
            self._error(router, ident, P.ErrorCode.BAD_MESSAGE,
                        f"expected exactly one frame after the routing id, got {len(frames) - 1}")
            return
        try:
            msg = P.decode(frames[1])
        except P.ProtocolError as e:
            self._error(router, ident, e.code, str(e))
            return
        now = time.monotonic()
        session = self._sessions.get(ident)
        if session is not None:
            session.last_seen = now
        if isinstance(msg, P.Heartbeat):
            self._reply(router, ident, P.Heartbeat(msg.seq, time.time()))
        elif isinstance(msg, P.Hello):
            self._on_hello(router, ident, msg, now)
        elif isinstance(msg, P.Bye):
            if session is not None:
                log.info("driver %s (%s) said bye: %s", session.driver, session.id, msg.reason)
                self._drop(ident)
        elif isinstance(msg, P.Observation):
            if session is None:
                self._error(router, ident, P.ErrorCode.NO_SESSION, "observation before handshake: send hello",
                            msg.request_id)
                return
            try:
                obs = check_observation(self.spec, msg.obs)
            except ValueError as e:
                self._error(router, ident, P.ErrorCode.BAD_OBSERVATION, str(e), msg.request_id)
                return
            self._enqueue(router, _Job(ident, session.id, msg, obs, time.perf_counter()))
        elif isinstance(msg, P.Transition):
            if session is None:
                self._error(router, ident, P.ErrorCode.NO_SESSION, "transition before handshake")
            else:
                self._on_transition(router, ident, session, msg, frames[1])
        else:
            self._error(router, ident, P.ErrorCode.UNKNOWN_TYPE, f"a driver may not send {msg.TYPE!r}")

    def _on_transition(self, router: zmq.Socket, ident: bytes, session: _Session, msg: P.Transition,
                       raw: bytes) -> None:
        try:
            if self.link is not None:  # journaled first: the learner's copy is the durable one
                check_transition(msg)
                self.link.record(session.id, session.driver, msg.policy_version or session.last_version, raw)
            if self.logger is not None:
                self.logger.add(session.id, session.driver, msg, session.calibration_id)
        except ValueError as e:
            self._error(router, ident, P.ErrorCode.BAD_MESSAGE, str(e))

    def _on_hello(self, router: zmq.Socket, ident: bytes, hello: P.Hello, now: float) -> None:
        if ident not in self._sessions and len(self._sessions) >= self.max_clients:
            self._error(router, ident, P.ErrorCode.TOO_MANY_CLIENTS, f"server full ({self.max_clients} drivers)")
            return
        problems, warnings = check_hello(self.spec, hello)
        if problems:
            self._error(router, ident, P.ErrorCode.SPEC_MISMATCH, "; ".join(problems))
            return
        if ident in self._sessions:
            self._drop(ident)  # a repeated Hello restarts the session
        s = _Session(ident, uuid.uuid4().hex[:12], hello.driver, now,
                     calibration_id=str(hello.meta.get("calibration_id", "") or ""))
        self._sessions[ident] = s
        log.info("driver %r connected: session %s (%d active)", hello.driver, s.id, len(self._sessions))
        spec = self.spec
        self._reply(router, ident, P.Welcome(
            session=s.id, obs_spec=P.obs_spec_to_wire(spec.obs_fields), action_dim=spec.action_dim,
            chunk_len=spec.chunk_len, control_hz=float(spec.control_hz), action_low=spec.action_low,
            action_high=spec.action_high, policy_version=str(spec.version), actor_type=spec.actor_type,
            heartbeat_s=self.heartbeat_s, session_timeout_s=self.session_timeout_s,
            log_transitions=self.logger is not None or self.link is not None, warnings=warnings))

    def _enqueue(self, router: zmq.Socket, job: _Job) -> None:
        with self._slots_lock:
            old = self._slots.get(job.ident)
            self._slots[job.ident] = job
        if old is None:
            self._ready.put(job.ident)
        else:
            self._error(router, job.ident, P.ErrorCode.SUPERSEDED,
                        f"observation {old.msg.request_id} replaced by {job.msg.request_id} before inference",
                        old.msg.request_id)

    def _drop(self, ident: bytes) -> None:
        s = self._sessions.pop(ident, None)
        with self._slots_lock:
            self._slots.pop(ident, None)
        if s is not None and self.logger is not None:
            self.logger.end_session(s.id)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for ident, s in list(self._sessions.items()):
            if now - s.last_seen > self.session_timeout_s:
                log.info("driver %r (session %s) silent for %.1f s: dropped", s.driver, s.id, now - s.last_seen)
                self._drop(ident)

    # -- inference workers ---------------------------------------------------------------------

    def _worker(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._results)
        try:
            while (ident := self._ready.get()) is not None:
                with self._slots_lock:
                    job = self._slots.pop(ident, None)
                if job is not None:
                    reply = self._infer(job)
                    version = reply.policy_version if isinstance(reply, P.Chunk) else ""
                    push.send_multipart([ident, P.encode(reply), version.encode()])
        finally:
            push.close(0)

    def _infer(self, job: _Job) -> P.Message:
        """The reply to one observation: a checked, clipped Chunk or an Error; never raises."""
        t_start = time.perf_counter()
        rid = job.msg.request_id
        policy = self.policy  # one policy computes the whole chunk, even if a push lands meanwhile
        spec = policy.spec
        try:
            result = policy.predict(job.obs)
        except ValueError as e:
            return self._worker_error(P.ErrorCode.BAD_OBSERVATION, f"policy refused the observation: {e}", rid)
        except Exception as e:
            log.exception("inference failed for request %d", rid)
            return self._worker_error(P.ErrorCode.POLICY_ERROR, f"inference failed: {type(e).__name__}: {e}", rid)
        try:
            actions, n_clipped = sanitize_actions(spec, result.actions)
        except ValueError as e:
            return self._worker_error(P.ErrorCode.POLICY_ERROR, str(e), rid)
        if n_clipped:
            self.stats.clipped_elements += n_clipped
            self.stats.clipped_chunks += 1
            if self.stats.clipped_chunks % 100 == 1:  # a policy that always clips must not flood the log
                log.warning("request %d: clipped %d action elements to the policy limits (%d chunks so far)",
                            rid, n_clipped, self.stats.clipped_chunks)
        self.stats.chunks += 1
        t_end = time.perf_counter()
        return P.Chunk(request_id=rid, episode_id=job.msg.episode_id, start_step=job.msg.step, actions=actions,
                       policy_version=str(spec.version), queue_ms=(t_start - job.t_recv) * 1e3,
                       infer_ms=float(result.infer_s) * 1e3, total_ms=(t_end - job.t_recv) * 1e3,
                       clipped=n_clipped)

    def _worker_error(self, code: str, message: str, rid: int) -> P.Error:
        self.stats.error(code)
        log.warning("request %d: %s: %s", rid, code, message)
        return P.Error(code, message, rid)


def load_policy(ref: str, threads: int = 1, providers: str = "auto") -> Policy:
    """A policy from ``--policy``: an ONNX file, 'default' (the shipped one), or
    ``hold:...``/``random:...`` for bring-up."""
    from policies.scripted import scripted_from_ref

    if ref in ("", "default"):
        from qc_robot.assets import default_policy_path

        ref = str(default_policy_path())

    scripted = scripted_from_ref(ref)
    if scripted is not None:
        return scripted
    from policies.onnx_policy import OnnxPolicy  # onnxruntime only when serving a model

    return OnnxPolicy(ref, providers=providers, threads=threads)


def run_serve(cfg: ServeConfig) -> int:
    """``qc-robot serve``: serve until Ctrl-C / SIGTERM; returns the process exit code."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = load_policy(cfg.policy, cfg.threads, cfg.providers)
    except (OSError, ValueError) as e:
        log.error("cannot load policy %r: %s", cfg.policy, e)
        return 2
    logger = None
    if cfg.log_dir:
        logger = EpisodeLogger(cfg.log_dir, _env_args(policy))
        log.info("logging served episodes to %s", logger.path)
    try:
        link = _learner_link(cfg)
        server = ControlServer(policy, cfg.bind, workers=cfg.workers, max_clients=cfg.max_clients,
                               heartbeat_s=cfg.heartbeat_s, session_timeout_s=cfg.session_timeout_s,
                               episode_logger=logger, allow_remote=cfg.allow_remote, learner_link=link)
        server.start()
    except (ValueError, RuntimeError, OSError) as e:
        log.error("%s", e)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    server.stop()
    log.info("stopped: %d chunks served, errors %s", server.stats.chunks, server.stats.errors or "none")
    return 0


def _learner_link(cfg: ServeConfig) -> LearnerLink | None:
    """The learner port from the config (None when ``learner_bind`` is empty)."""
    if not cfg.learner_bind:
        return None
    from policies.onnx_policy import OnnxPolicy
    from qc_robot.server.journal import Journal
    from qc_robot.server.learner_link import CurveKeys

    curve = None
    if cfg.curve_secret_key:
        curve = CurveKeys.from_files(cfg.curve_secret_key, authorized_dir=cfg.curve_authorized_dir)

    def loader(path: str, version: str) -> Policy:
        return OnnxPolicy(path, providers=cfg.providers, threads=cfg.threads, version=version)

    return LearnerLink(cfg.learner_bind, Journal(cfg.journal_dir), curve=curve, prune=cfg.journal_prune,
                       timeout_s=cfg.learner_timeout_s, policy_loader=loader)


def _env_args(policy: Policy) -> dict[str, Any]:
    spec = policy.spec
    return {"source": "qc-robot serve", "policy_version": str(spec.version), "actor_type": spec.actor_type,
            "obs_keys": [f.key for f in spec.obs_fields], "action_dim": spec.action_dim,
            "chunk_len": spec.chunk_len, "control_hz": float(spec.control_hz)}


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
