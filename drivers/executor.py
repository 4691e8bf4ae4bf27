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

**Pipelining** (``max_inflight`` > 1; not ``open_loop``): with one request in flight, a delay of d
steps leaves only H − d fresh actions per reply, so at d > H/2 the robot holds between replies
(at H = 5, d = 3: every third tick). The executor then keeps further requests in flight,
staggered, each conditioned on its own observation: it asks whenever what is queued *or asked
for* runs out within d steps, so a fresh chunk lands every H − d steps with zero held ticks
whenever d < H. How many are in flight follows from the measured d; ``max_inflight`` bounds it
(and the server's ``max_inflight``, advertised in its Welcome). ``rtc`` names the newest chunk
asked for as the one to continue: the server computes a session's requests in order, so that is
the chunk that will be executing when the new one arrives. When d ≥ H no mode keeps up and the
executor says so once, naming what to change.

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

    def cancel(self, timed_out: bool = False) -> None:
        """Forget every request in flight (their replies are then dropped)."""


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
    behind: int = 0
    """Chunks that arrived after their whole span had passed (delay >= H: no mode keeps up)."""
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
                 gate: Callable[[P.Chunk], bool] | None = None, gate_retry_s: float = 0.01,
                 max_inflight: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.source, self.chunk_len, self.mode = source, chunk_len, mode
        self.threshold, self.request_timeout_s = threshold, request_timeout_s
        self.max_inflight = 1 if mode == "open_loop" else max_inflight
        """Requests in flight at most (pipelining; ``open_loop`` never asks ahead). How many are
        sent is set by the measured delay (see ``_want_chunk``): one while d is small."""
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
        self._inflight: list[_Inflight] = []  # oldest first
        self._recent_delays: collections.deque[int] = collections.deque(maxlen=8)
        self._chunk_start = -1
        """start_step of the chunk the queue holds (``rtc``: sent as ``prev_start_step``)."""
        self.last_seq = -1
        """Sequence number (count of chunks accepted, from 0) of the chunk whose action was executed
        last; ``temporal_ensemble``: the newest chunk in the blend. A change marks a seam."""
        self._versions: dict[int, str] = {}  # chunk seq → the policy version that made it (recent ones)
        self._warned_behind = False

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

    @property
    def inflight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._inflight)

    def reset(self) -> None:
        """New episode: drop queued actions and forget the requests in flight (their replies are stale)."""
        self._queue.clear()
        self._ensemble.clear()
        self._chunk_start = -1
        if self._inflight:
            self.source.cancel()
            self._inflight = []

    def act(self, obs: dict[str, np.ndarray], step: int, episode_id: int) -> np.ndarray | None:
        """The action for control ``step`` of ``episode_id`` (None: nothing valid, hold)."""
        self._take_replies(step)
        if self._inflight and self.clock() - self._inflight[0].sent > self.request_timeout_s:
            log.warning("request %d unanswered after %.1f s: given up", self._inflight[0].request_id,
                        self.request_timeout_s)
            self._give_up()
        self._drop_stale(step)
        if len(self._inflight) < self.max_inflight and self._want_chunk(step):
            self._request(obs, episode_id, step)
        if self.wait_when_empty:  # the world waits for the policy: no step passes during inference
            while True:
                while self._inflight:
                    left = self.request_timeout_s - (self.clock() - self._inflight[0].sent)
                    if left <= 0:
                        self._give_up()
                        break
                    self._accept(self.source.poll(min(left, 0.05)), step)
                if self.queued or not self._refused:
                    break
                self._refused = False  # the gate wants a newer policy: ask again shortly
                time.sleep(self.gate_retry_s)
                if not self._request(obs, episode_id, step, plain=True):
                    break
        elif self.tick_wait_s > 0 and not self._has_action(step) and self._inflight:
            deadline = self.clock() + self.tick_wait_s
            while self._inflight and not self._has_action(step) and (left := deadline - self.clock()) > 1e-4:
                self._accept(self.source.poll(left), step)
        return self._pop(step)

    def idle(self, deadline: float, next_step: int) -> None:
        """Wait for replies until ``deadline`` (on ``clock``) between ticks, so a reply is taken in
        (and its round trip measured) when it arrives, not at the next tick."""
        while self._inflight:
            left = deadline - self.clock()
            if left < 1e-3:  # socket polls have 1 ms resolution: do not spin
                return
            self._accept(self.source.poll(left), next_step)

    # -- internals -----------------------------------------------------------------------------

    def _request(self, obs: dict[str, np.ndarray], episode_id: int, step: int, plain: bool = False) -> bool:
        if self.mode == "rtc" and not plain:
            # continue the newest chunk asked for: the server computes a session's requests in
            # order, so a pipelined one's predecessor is the last chunk it made (docs/rtc.md)
            prev = self._inflight[-1].step if self._inflight else self._chunk_start if self._queue else -1
            rid = self.source.request(obs, episode_id, step, reset=step == 0, prev_start_step=prev,
                                      delay_steps=self.delay_steps)
        else:
            rid = self.source.request(obs, episode_id, step, reset=step == 0)
        if rid is None:
            return False
        self.stats.requests += 1
        self._inflight.append(_Inflight(rid, step, self.clock()))
        return True

    def _give_up(self) -> None:
        """The oldest request timed out: the source reconnects, so every request in flight is lost."""
        self.stats.timeouts += 1
        self.source.cancel(timed_out=True)
        self._inflight = []

    def _take_replies(self, step: int) -> None:
        while self._inflight:
            reply = self.source.poll(0.0)
            if reply is None:
                return
            self._accept(reply, step)

    def _has_action(self, step: int) -> bool:
        if self.mode == "temporal_ensemble":
            return step in self._ensemble
        return bool(self._queue) and self._queue[0][0] == step  # stale ones dropped: the front is >= step

    def _covered_until(self) -> int:
        """The last step that the queue, or a request in flight once answered, has an action for."""
        end = self._queue[-1][0] if self._queue else -1
        if self._inflight:
            end = max(end, self._inflight[-1].step + self.chunk_len - 1)
        return end

    def _want_chunk(self, step: int) -> bool:
        if self.mode == "open_loop":
            return not self._queue and not self._inflight  # never ask while a chunk is queued
        if self.mode == "temporal_ensemble":
            return True  # every step a request can be made (up to max_inflight in flight)
        # ask when what is covered (queued, or asked for) runs out within the measured delay: a
        # request sent now arrives d steps later, just as the coverage ends. With one in flight
        # this is the classic "queue at the low-water mark"; with more it staggers requests so a
        # fresh chunk lands every H - d steps (pipelining).
        low_water = max(math.ceil(self.threshold * self.chunk_len), self.delay_steps)
        if self._inflight and self._inflight[-1].step >= step:
            return False  # one request per step at most
        return self._covered_until() - step + 1 <= low_water

    def _accept(self, reply: P.Chunk | P.Error | None, step: int) -> None:
        if reply is None or not self._inflight:
            return
        match = next((i for i, f in enumerate(self._inflight) if f.request_id == reply.request_id), None)
        if match is None:
            return  # the client filters these; belt and braces
        inflight = self._inflight.pop(match)
        sent_step, rtt = inflight.step, self.clock() - inflight.sent
        if isinstance(reply, P.Error):
            self.stats.errors += 1
            log.warning("request %d failed: %s: %s", reply.request_id, reply.code, reply.message)
            if reply.code == P.ErrorCode.NO_SESSION:
                self._inflight = []  # the server lost our session: none of them will be answered
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
        if delay >= len(actions):
            self._behind(delay, len(actions))
        if self.mode == "open_loop":
            self._queue = collections.deque((step + i, a, seq) for i, a in enumerate(actions))
        elif self.mode == "temporal_ensemble":  # every prediction for a step is kept, oldest first
            for i, a in enumerate(actions):
                if reply.start_step + i >= step:
                    self._ensemble.setdefault(reply.start_step + i, []).append((seq, a))
        elif reply.start_step < self._chunk_start:
            self.stats.dropped_stale += len(actions)  # overtaken by a newer request's chunk
        else:  # each action keeps the step it was planned for; the newest chunk replaces the rest
            self._queue = collections.deque((reply.start_step + i, a, seq) for i, a in enumerate(actions))
            self._chunk_start = reply.start_step

    def _behind(self, delay: int, chunk_len: int) -> None:
        """No mode keeps up when a reply takes the whole chunk: say what to change (once)."""
        self.stats.behind += 1
        if self._warned_behind:
            return
        self._warned_behind = True
        log.warning("inference delay %d steps >= chunk length %d: every action of the chunk is stale on "
                    "arrival, so the robot holds between replies in every asynchronous mode, pipelined or "
                    "not. Use a policy with a longer chunk (H > %d), a faster robot PC or a GPU for the "
                    "server, or a closer network; until then mode=open_loop, which runs each chunk whole "
                    "from its arrival and holds while the next is computed. docs/rtc.md says how to measure "
                    "the delay.", delay, chunk_len, delay)

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
