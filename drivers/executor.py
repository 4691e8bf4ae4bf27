"""The chunk broker on the robot side: which action to execute this control step.

Four strategies, one object (``mode``):

* ``open_loop`` (QC's default): execute all H actions of a chunk, then ask again. Never
  requests while a chunk is queued, so no inference is wasted.
* ``latency_aware``: ask for the next chunk early, when the queue falls to the measured
  inference delay (or ``threshold``·H, whichever is larger); every action carries the step it
  was planned for (chunk start_step + i) and actions whose step has passed are dropped. The
  delay is *measured* per reply as the control steps between request and arrival. The new
  chunk replaces the rest of the old one, with no continuity at the seam.
* ``rtc`` (real-time chunking): requested as ``latency_aware``, but each request also says
  which chunk is executing (``prev_start_step``) and the delay to expect (``delay_steps``, the
  measured one), so the policy freezes the actions that will run anyway and continues the rest
  of the old plan smoothly (docs/rtc.md). A policy that cannot guide answers a plain chunk and
  this behaves as ``latency_aware``.
* ``temporal_ensemble`` (ACT's temporal ensembling, a baseline): ask whenever no request is
  in flight; the action for a step is the average of every prediction received for it,
  weighted ``exp(-m·j)`` with j = 0 for the oldest (``ensemble_m``, ACT's m = 0.01).

The executor returns None when it has nothing valid for the step; the safety layer then holds.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qc_robot import protocol as P

log = logging.getLogger("qc_robot.executor")
MODES = ("open_loop", "latency_aware", "rtc", "temporal_ensemble")


class ChunkSource(Protocol):
    """What the executor needs from a client (``qc_robot.drivers.client.PolicyClient`` implements it).

    In ``rtc`` mode ``request`` is also given ``prev_start_step`` (start step of the chunk being
    executed, -1 for none) and ``delay_steps`` (steps the answer is expected to take) as keywords.
    """

    def request(self, obs: dict[str, np.ndarray], episode_id: int, step: int, reset: bool = False,
                prev_start_step: int = -1, delay_steps: int = -1) -> int | None: ...

    def poll(self, timeout_s: float = 0.0) -> P.Chunk | P.Error | None: ...

    def cancel(self, timed_out: bool = False) -> None: ...


@dataclass
class ExecutorStats:
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    timeouts: int = 0
    executed: int = 0
    empty: int = 0
    """Steps with nothing to execute (held by the safety layer)."""
    dropped_stale: int = 0
    """Actions dropped because their step had passed when they arrived."""
    frozen: int = 0
    """Actions the server reported frozen to the previous chunk (``rtc``)."""
    gated: int = 0
    """Chunks the gate refused (lockstep pacing: from a policy not newer than the last block's)."""
    rtt_ms: list[float] = field(default_factory=list)
    delay_steps: list[int] = field(default_factory=list)


@dataclass
class _Inflight:
    request_id: int
    step: int
    sent: float


class ChunkExecutor:
    """Turns a stream of chunk replies into one action per control step."""

    def __init__(self, source: ChunkSource, chunk_len: int, mode: str = "open_loop", threshold: float = 0.5,
                 request_timeout_s: float = 2.0, wait_when_empty: bool = False,
                 clock: Callable[[], float] = time.monotonic, initial_delay_steps: int = 0,
                 tick_wait_s: float = 0.0, ensemble_m: float = 0.01,
                 gate: Callable[[P.Chunk], bool] | None = None, gate_retry_s: float = 0.01) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.source, self.chunk_len, self.mode = source, chunk_len, mode
        self.threshold, self.request_timeout_s = threshold, request_timeout_s
        self.wait_when_empty = wait_when_empty
        """Lockstep drivers: block for each reply (the world waits too, so the delay is 0 steps)."""
        self.tick_wait_s = tick_wait_s
        """Realtime drivers: how long a tick with nothing queued may wait for the reply to the request
        it just sent. A reply within it serves this very tick (QC's open loop: the chunk answering
        the observation of step t starts at t) instead of costing a held tick per chunk."""
        self.clock = clock
        self.initial_delay_steps = max(0, int(initial_delay_steps))
        """Delay estimate before any reply is measured (e.g. the calibration file's)."""
        self.ensemble_m = ensemble_m
        """``temporal_ensemble``: weight exp(-m·j) for the j-th oldest prediction of a step."""
        self.gate, self.gate_retry_s = gate, gate_retry_s
        """Lockstep only: a chunk the gate refuses is dropped and asked for again after
        ``gate_retry_s`` (``qc_robot.drivers.runner.PolicyPace``: wait for a newer policy)."""
        self._refused = False
        self.stats = ExecutorStats()
        self._queue: collections.deque[tuple[int, np.ndarray, int]] = collections.deque()  # (step, action, seq)
        self._ensemble: dict[int, list[tuple[int, np.ndarray]]] = {}  # step → [(seq, action)], oldest first
        self._inflight: _Inflight | None = None
        self._recent_delays: collections.deque[int] = collections.deque(maxlen=8)
        self._chunk_start = -1
        """start_step of the chunk the queue holds (``rtc``: sent as ``prev_start_step``)."""
        self.last_seq = -1
        """Sequence number (count of chunks accepted, from 0) of the chunk whose action was executed
        last; ``temporal_ensemble``: the newest chunk in the blend. A change marks a seam."""
        self._versions: dict[int, str] = {}  # chunk seq → the policy version that made it (recent ones)

    @property
    def delay_steps(self) -> int:
        """Measured inference delay in control steps (max of the last 8 replies; before any, the
        initial estimate)."""
        return max(self._recent_delays, default=self.initial_delay_steps)

    @property
    def last_version(self) -> str:
        """Policy version of the chunk whose action was executed last ('' before any)."""
        return self._versions.get(self.last_seq, "")

    @property
    def queued(self) -> int:
        return len(self._ensemble) if self.mode == "temporal_ensemble" else len(self._queue)

    def reset(self) -> None:
        """New episode: drop queued actions and forget the request in flight (its reply is stale)."""
        self._queue.clear()
        self._ensemble.clear()
        self._chunk_start = -1
        if self._inflight is not None:
            self.source.cancel()
            self._inflight = None

    def act(self, obs: dict[str, np.ndarray], step: int, episode_id: int) -> np.ndarray | None:
        """The action for control ``step`` of ``episode_id`` (None: nothing valid, hold)."""
        self._accept(self.source.poll(0.0), step)
        if self._inflight is not None and self.clock() - self._inflight.sent > self.request_timeout_s:
            log.warning("request %d unanswered after %.1f s: given up", self._inflight.request_id,
                        self.request_timeout_s)
            self.stats.timeouts += 1
            self.source.cancel(timed_out=True)
            self._inflight = None
        self._drop_stale(step)
        if self._inflight is None and self._want_chunk():
            if self.mode == "rtc":
                rid = self.source.request(obs, episode_id, step, reset=step == 0,
                                          prev_start_step=self._chunk_start if self._queue else -1,
                                          delay_steps=self.delay_steps)
            else:
                rid = self.source.request(obs, episode_id, step, reset=step == 0)
            if rid is not None:
                self.stats.requests += 1
                self._inflight = _Inflight(rid, step, self.clock())
        if self.wait_when_empty:  # the world waits for the policy: no step passes during inference
            while True:
                while self._inflight is not None:
                    left = self.request_timeout_s - (self.clock() - self._inflight.sent)
                    if left <= 0:
                        self.stats.timeouts += 1
                        self.source.cancel(timed_out=True)
                        self._inflight = None
                        break
                    self._accept(self.source.poll(min(left, 0.05)), step)
                if self.queued or not self._refused:
                    break
                self._refused = False  # the gate wants a newer policy: ask again shortly
                time.sleep(self.gate_retry_s)
                rid = self.source.request(obs, episode_id, step, reset=step == 0)
                if rid is None:
                    break
                self.stats.requests += 1
                self._inflight = _Inflight(rid, step, self.clock())
        elif self.tick_wait_s > 0 and self.queued == 0 and self._inflight is not None:
            deadline = self.clock() + self.tick_wait_s
            while self._inflight is not None and (left := deadline - self.clock()) > 1e-4:
                self._accept(self.source.poll(left), step)
        return self._pop(step)

    def idle(self, deadline: float, next_step: int) -> None:
        """Wait for replies until ``deadline`` (on ``clock``) between ticks, so a reply is taken in
        (and its round trip measured) when it arrives, not at the next tick."""
        while self._inflight is not None:
            left = deadline - self.clock()
            if left < 1e-3:  # socket polls have 1 ms resolution: do not spin
                return
            self._accept(self.source.poll(left), next_step)

    # -- internals -----------------------------------------------------------------------------

    def _want_chunk(self) -> bool:
        if self.mode == "open_loop":
            return not self._queue  # never ask while a chunk is queued
        if self.mode == "temporal_ensemble":
            return True  # every step a request can be made (one in flight at a time)
        low_water = max(math.ceil(self.threshold * self.chunk_len), self.delay_steps)
        return len(self._queue) <= low_water

    def _accept(self, reply: P.Chunk | P.Error | None, step: int) -> None:
        if reply is None or self._inflight is None:
            return
        if reply.request_id != self._inflight.request_id:
            return  # the client filters these; belt and braces
        sent_step, rtt = self._inflight.step, self.clock() - self._inflight.sent
        self._inflight = None
        if isinstance(reply, P.Error):
            self.stats.errors += 1
            log.warning("request %d failed: %s: %s", reply.request_id, reply.code, reply.message)
            return
        if reply.start_step != sent_step:
            log.error("chunk for step %d answers a request made at step %d: dropped", reply.start_step, sent_step)
            return
        if self.gate is not None and not self.gate(reply):
            self.stats.gated += 1
            self._refused = True
            return
        self.stats.chunks += 1
        delay = step - sent_step
        self._recent_delays.append(delay)
        if len(self.stats.rtt_ms) < 100_000:
            self.stats.rtt_ms.append(rtt * 1e3)
            self.stats.delay_steps.append(delay)
        actions = np.asarray(reply.actions, np.float32)  # (H, A)
        seq = self.stats.chunks - 1
        self._versions[seq] = reply.policy_version
        self._versions.pop(seq - 64, None)  # a queue never holds chunks that old
        self.stats.frozen += int(getattr(reply, "frozen", 0))
        if self.mode == "open_loop":
            self._queue = collections.deque((step + i, a, seq) for i, a in enumerate(actions))
        elif self.mode == "temporal_ensemble":  # every prediction for a step is kept, oldest first
            for i, a in enumerate(actions):
                if reply.start_step + i >= step:
                    self._ensemble.setdefault(reply.start_step + i, []).append((seq, a))
        else:  # each action keeps the step it was planned for; the newest chunk replaces the rest
            self._queue = collections.deque((reply.start_step + i, a, seq) for i, a in enumerate(actions))
            self._chunk_start = reply.start_step
            if delay >= len(actions):
                log.warning("inference delay %d steps >= chunk length %d: every action is stale",
                            delay, len(actions))

    def _drop_stale(self, step: int) -> None:
        while self._queue and self._queue[0][0] < step:
            self._queue.popleft()
            self.stats.dropped_stale += 1
        for s in [s for s in self._ensemble if s < step]:
            self.stats.dropped_stale += len(self._ensemble.pop(s))

    def _pop(self, step: int) -> np.ndarray | None:
        self._drop_stale(step)
        if self.mode == "temporal_ensemble":
            preds = self._ensemble.pop(step, None)
            if preds:
                self.stats.executed += 1
                self.last_seq = preds[-1][0]
                w = np.exp(-self.ensemble_m * np.arange(len(preds)))  # (K,) oldest first, as ACT
                stacked = np.stack([a for _, a in preds])  # (K, A)
                return ((w[:, None] * stacked).sum(0) / w.sum()).astype(np.float32)
        elif self._queue and self._queue[0][0] == step:
            self.stats.executed += 1
            _, action, self.last_seq = self._queue.popleft()
            return action
        self.stats.empty += 1
        return None
