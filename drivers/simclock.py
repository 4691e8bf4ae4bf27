"""Execution on a simulated clock: a policy whose answers take a fixed number of control steps.

For benchmarks and tests of the executor modes without wall-clock waits: with a lockstep
driver, ``DelayedPolicySource`` plays the server. A request made at step t is computed at once
from the observation of step t, and its reply becomes visible to ``poll`` at step
``t + delay_steps`` (an inference delay of ``delay_steps`` control periods; meanwhile the
executor keeps running the old chunk or holds). Like the control server it keeps the last chunk
it answered and continues it for a real-time-chunking request whose ``prev_start_step`` names
it, so the same guidance path runs (``policy.predict(obs, guide)``). ``StepDelayedSource`` puts
the same delay in front of a real server (``drive realtime=false inference_delay_steps=k``).

numpy only, like the rest of ``drivers/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qc_robot import protocol as P
from qc_robot.policies.base import Policy, align_guide

if TYPE_CHECKING:
    from qc_robot.drivers.executor import ChunkSource


@dataclass
class _Pending:
    reply: P.Chunk
    ready_at: int


class DelayedPolicySource:
    """A :class:`qc_robot.drivers.executor.ChunkSource` backed by ``policy``, answering ``delay_steps``
    control steps after each request (a sequence: request k takes ``delay_steps[k % len]``, a
    jittery delay); ``now()`` returns the current control step."""

    def __init__(self, policy: Policy, delay_steps: int | Sequence[int], now: Callable[[], int]) -> None:
        delays = [delay_steps] if isinstance(delay_steps, int) else list(delay_steps)
        if not delays or min(delays) < 0:
            raise ValueError(f"delay_steps must be >= 0, got {delay_steps!r}")
        self.policy, self.delays, self.now = policy, [int(d) for d in delays], now
        self.chunks: list[P.Chunk] = []
        """Every chunk answered, in order (for tests and metrics)."""
        self.infer_s: list[float] = []
        self._pending: list[_Pending] = []  # in request order (a pipelining executor has several)
        self._last: tuple[int, int, np.ndarray] | None = None  # episode, start_step, actions
        self._rid = 0

    def request(self, obs: dict[str, np.ndarray], episode_id: int, step: int, reset: bool = False,
                prev_start_step: int = -1, delay_steps: int = -1) -> int:
        self._rid += 1
        guide = None
        last = self._last
        if (prev_start_step >= 0 and not reset and last is not None and last[0] == episode_id
                and last[1] == prev_start_step and getattr(self.policy, "supports_guidance", False)):
            guide = align_guide(last[2], prev_start_step, step, max(delay_steps, 0))
        result = self.policy.predict(obs, guide) if guide is not None else self.policy.predict(obs)  # type: ignore[call-arg]
        actions = np.asarray(result.actions, np.float32)
        self.infer_s.append(result.infer_s)
        self._last = (episode_id, step, actions)
        reply = P.Chunk(self._rid, episode_id, step, actions, str(self.policy.spec.version), 0.0,
                        result.infer_s * 1e3, result.infer_s * 1e3, frozen=int(getattr(result, "frozen", 0)))
        self.chunks.append(reply)
        self._pending.append(_Pending(reply, step + self.delays[(self._rid - 1) % len(self.delays)]))
        return self._rid

    def poll(self, timeout_s: float = 0.0) -> P.Chunk | None:
        """The earliest-due reply that is due now (one per call)."""
        due = [p for p in self._pending if p.ready_at <= self.now()]
        if not due:
            return None
        first = min(due, key=lambda p: p.ready_at)
        self._pending.remove(first)
        return first.reply

    def cancel(self, timed_out: bool = False) -> None:
        self._pending = []


def seam_jerk(actions: Sequence[np.ndarray], seqs: Sequence[int]) -> tuple[float, int]:
    """Mean squared second difference of the commanded actions at chunk seams, and the number of
    seams.

    ``seqs[t]`` is the chunk that step t's action came from (-1: held, the driver's hold action
    was commanded). A seam is a step whose chunk differs from the last chunk executed before it
    (held steps in between are skipped when comparing, but their commanded actions count). It
    contributes the mean of the two second differences that straddle it,
    ``‖a[t] − 2a[t−1] + a[t−2]‖²`` and ``‖a[t+1] − 2a[t] + a[t−1]‖²`` (where they exist), summed
    over action dimensions.
    """
    a = np.asarray(actions, np.float64)  # (T, A)
    vals, last = [], -1
    for t, seq in enumerate(seqs):
        if seq < 0:
            continue
        if last >= 0 and seq != last:
            parts = [float(np.sum((a[u + 1] - 2 * a[u] + a[u - 1]) ** 2)) for u in (t - 1, t) if 1 <= u < len(a) - 1]
            if parts:
                vals.append(float(np.mean(parts)))
        last = seq
    return (float(np.mean(vals)) if vals else 0.0), len(vals)


class StepDelayedSource:
    """A real chunk source (a ``PolicyClient``) whose replies are released ``delay_steps`` control
    steps after their request, on the lockstep world's clock (``drive realtime=false
    inference_delay_steps=``): the delay a slow robot PC or network would add, reproduced exactly.

    A reply that is due is waited for (the world waits, as in lockstep), one that arrives early is
    held back; so the executor meets the same delay whatever the machine's speed, and a seeded run
    repeats. ``now()`` returns the steps executed in the current episode."""

    def __init__(self, source: ChunkSource, delay_steps: int, now: Callable[[], int], timeout_s: float = 2.0) -> None:
        if delay_steps < 0:
            raise ValueError(f"inference_delay_steps must be >= 0, got {delay_steps}")
        self.source, self.delay_steps, self.now, self.timeout_s = source, delay_steps, now, timeout_s
        self._due: dict[int, int] = {}  # request id → the step its reply is released at
        self._arrived: dict[int, P.Chunk | P.Error] = {}

    def request(self, obs: dict[str, np.ndarray], episode_id: int, step: int, reset: bool = False,
                prev_start_step: int = -1, delay_steps: int = -1) -> int | None:
        rid = self.source.request(obs, episode_id, step, reset=reset, prev_start_step=prev_start_step,
                                  delay_steps=delay_steps)
        if rid is not None:
            self._due[rid] = step + self.delay_steps
        return rid

    def poll(self, timeout_s: float = 0.0) -> P.Chunk | P.Error | None:
        """The earliest-due reply that is due now, waited for if it has not arrived yet."""
        due = sorted((d, rid) for rid, d in self._due.items() if d <= self.now())
        if not due:
            return None
        rid = due[0][1]
        deadline = time.monotonic() + self.timeout_s
        while rid not in self._arrived and (left := deadline - time.monotonic()) > 0:
            reply = self.source.poll(min(left, 0.05))
            if reply is not None and reply.request_id in self._due:
                self._arrived[reply.request_id] = reply
        if rid not in self._arrived:
            return None  # the executor's request timeout gives it up
        del self._due[rid]
        return self._arrived.pop(rid)

    def cancel(self, timed_out: bool = False) -> None:
        self.source.cancel(timed_out=timed_out)
        self._due.clear()
        self._arrived.clear()
