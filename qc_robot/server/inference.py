"""The control server's inference workers: admitted observations → checked chunks.

Workers take jobs from the :class:`~qc_robot.server.scheduler.FairScheduler` (one slot per
session, least inference time first), decode the job's JPEG images (off the socket loop, within
the peer's decode budget), run the policy, check and clip its actions, and hand the encoded
reply back to the socket loop over an inproc socket.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from qc_robot import protocol as P
from qc_robot.policies.base import ChunkGuide, Policy, align_guide
from qc_robot.server.admission import DecodeBudget
from qc_robot.server.checks import sanitize_actions
from qc_robot.server.ratelog import RateLimitedLog
from qc_robot.server.scheduler import FairScheduler

log = logging.getLogger("qc_robot.server")


@dataclass
class Job:
    ident: bytes
    session: str
    msg: P.Observation
    obs: dict[str, Any]
    """Checked arrays, and ``P.PendingImage`` for JPEG images still to decode."""
    t_recv: float


@dataclass
class ServerStats:
    received: int = 0
    chunks: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Refused messages by error code (answered or not)."""
    unanswered: int = 0
    """Error replies not sent because the peer (or all peers together) exceeded its error budget."""
    transitions: int = 0
    """Transitions accepted (validated, then journaled/logged)."""
    clipped_elements: int = 0
    clipped_chunks: int = 0
    flood_dropped: int = 0
    """Messages dropped unread from peers whose observations kept superseding each other."""
    images_decoded: int = 0
    """JPEG images decoded (only for admitted observations, on the workers)."""
    decode_s: float = 0.0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class Inference:
    """State the workers share: the scheduler, each session's last chunk (for real-time chunking)."""

    def __init__(self, policy: Callable[[], Policy], stats: ServerStats, decode: DecodeBudget,
                 warn: RateLimitedLog, depth: int = 1) -> None:
        self._policy = policy
        self.stats, self.decode, self._warn = stats, decode, warn
        self.queue: FairScheduler[bytes, Job] = FairScheduler(depth)
        self._lock = threading.Lock()
        self._last_chunk: dict[bytes, tuple[int, int, np.ndarray]] = {}
        """Per driver, the last chunk sent (episode_id, start_step, actions): what a real-time
        chunking request continues."""
        self._live: set[bytes] = set()  # sessions whose last chunk may be kept

    def open(self, ident: bytes) -> None:
        with self._lock:
            self._live.add(ident)

    def forget(self, ident: bytes) -> list[Job]:
        """Drop what is kept for ``ident`` (its session ended); returns its queued jobs."""
        with self._lock:
            self._live.discard(ident)
            self._last_chunk.pop(ident, None)
        return self.queue.drop(ident)

    def kept(self) -> int:
        with self._lock:
            return len(self._last_chunk)

    def run(self, ctx: zmq.Context, results: str) -> None:
        """A worker thread's body: until the scheduler closes."""
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(results)
        try:
            while (item := self.queue.get()) is not None:
                ident, job = item
                t0 = time.perf_counter()
                try:
                    reply = self.answer(job)
                finally:  # always: the session's next job waits for it
                    self.queue.charge(ident, time.perf_counter() - t0)
                version = reply.policy_version if isinstance(reply, P.Chunk) else ""
                push.send_multipart([ident, P.encode(reply), version.encode(), struct.pack("<d", job.t_recv)])
        finally:
            push.close(0)

    def answer(self, job: Job) -> P.Message:
        """The reply to one observation: a checked, clipped Chunk or an Error; never raises."""
        rid = job.msg.request_id
        pending = {k: v for k, v in job.obs.items() if isinstance(v, P.PendingImage)}
        if pending:
            t0 = time.perf_counter()
            try:
                for k, img in pending.items():
                    job.obs[k] = img.decode()
            except P.ProtocolError as e:
                return self._error(P.ErrorCode.BAD_MESSAGE, str(e), rid)
            finally:
                spent = time.perf_counter() - t0
                self.decode.spent(job.ident, spent)
                self.stats.images_decoded += len(pending)
                self.stats.decode_s += spent
        return self._infer(job)

    def _infer(self, job: Job) -> P.Message:
        t_start = time.perf_counter()
        rid = job.msg.request_id
        policy = self._policy()  # one policy computes the whole chunk, even if a push lands meanwhile
        spec = policy.spec
        guide = self._guide(job, spec.chunk_len) if getattr(policy, "supports_guidance", False) else None
        try:
            # only guidance-capable policies (supports_guidance) take a guide
            result = policy.predict(job.obs, guide) if guide is not None else policy.predict(job.obs)  # type: ignore[call-arg]
        except ValueError as e:
            return self._error(P.ErrorCode.BAD_OBSERVATION, f"policy refused the observation: {e}", rid)
        except Exception as e:
            log.exception("inference failed for request %d", rid)
            return self._error(P.ErrorCode.POLICY_ERROR, f"inference failed: {type(e).__name__}: {e}", rid)
        try:
            actions, n_clipped = sanitize_actions(spec, result.actions)
        except ValueError as e:
            return self._error(P.ErrorCode.POLICY_ERROR, str(e), rid)
        if n_clipped:
            self.stats.clipped_elements += n_clipped
            self.stats.clipped_chunks += 1
            if self.stats.clipped_chunks % 100 == 1:  # a policy that always clips must not flood the log
                log.warning("request %d: clipped %d action elements to the policy limits (%d chunks so far)",
                            rid, n_clipped, self.stats.clipped_chunks)
        self.stats.chunks += 1
        with self._lock:
            if job.ident in self._live:  # a session dropped meanwhile leaves nothing behind
                self._last_chunk[job.ident] = (job.msg.episode_id, job.msg.step, actions)
        t_end = time.perf_counter()
        return P.Chunk(request_id=rid, episode_id=job.msg.episode_id, start_step=job.msg.step, actions=actions,
                       policy_version=str(spec.version), queue_ms=(t_start - job.t_recv) * 1e3,
                       infer_ms=float(result.infer_s) * 1e3, total_ms=(t_end - job.t_recv) * 1e3,
                       clipped=n_clipped, frozen=int(getattr(result, "frozen", 0)))

    def _guide(self, job: Job, chunk_len: int) -> ChunkGuide | None:
        """The previous chunk a real-time-chunking request continues: the last chunk sent to this
        driver, if it is the one the driver says it executes (same episode and start step)."""
        msg = job.msg
        if msg.prev_start_step < 0 or msg.reset:
            return None
        with self._lock:
            last = self._last_chunk.get(job.ident)
        if last is None or last[0] != msg.episode_id or last[1] != msg.prev_start_step:
            return None
        if last[2].shape[0] != chunk_len:  # a policy swap changed H: nothing to continue
            return None
        return align_guide(last[2], msg.prev_start_step, msg.step, max(msg.delay_steps, 0))

    def _error(self, code: str, message: str, rid: int) -> P.Error:
        self.stats.error(code)
        self._warn.warn(f"worker-{code}", "request %d: %s: %.300s", rid, code, message)
        return P.Error(code, message, rid)
